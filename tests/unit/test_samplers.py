"""renderfarm/samplers.py: A1111 sampler names to diffusers schedulers, what each family may use, and what
diffusers does with the config flags a scheduler does not take (pinned: the check relies on it)."""

from __future__ import annotations

import pytest

from renderfarm.samplers import SAMPLERS, SCHEDULES, check, scheduler_for


def test_every_sampler_is_a_diffusers_scheduler_taking_the_schedules_listed():
    """The table is written out (a submit must not import diffusers): it must say what diffusers' classes take."""
    import inspect

    import diffusers

    for variants in SAMPLERS.values():
        for variant in variants:
            takes = inspect.signature(getattr(diffusers, variant.scheduler).__init__).parameters
            honoured = tuple(name for name, flag in SCHEDULES.items() if flag is not None and flag in takes)
            assert variant.schedules == honoured, variant


def test_unknown_and_family_mismatch_are_refused_with_reasons():
    assert check(None, None, flow=False, family="sd15") is None
    assert check("Euler a", None, flow=False, family="sd15") is None
    assert "unknown sampler" in check("Euler z", None, flow=False, family="sd15")
    assert "unknown schedule type" in check("Euler", "Karras2", flow=False, family="sd15")
    refused = check("Euler a", None, flow=True, family="flux")
    assert "cannot render flux" in refused and "Euler" in refused
    assert "needs a sampler" in check(None, "Karras", flow=False, family="sd15")
    assert check(None, "Automatic", flow=False, family="sd15") is None
    assert "no Karras schedule" in check("Euler a", "Karras", flow=False, family="sd15")
    assert check("DPM++ 2M", "Karras", flow=False, family="sdxl") is None


def test_from_config_silently_drops_flags_a_scheduler_does_not_take():
    """Why `check` asks the scheduler's signature: diffusers' from_config ignores a flag the class does not take
    (a warning only), so "Euler a" + Karras would render Normal sigmas under a Karras label. If a diffusers
    upgrade makes EulerAncestral take use_karras_sigmas, this fails: then let the check allow it."""
    from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

    base = EulerDiscreteScheduler(num_train_timesteps=1000).config
    made = EulerAncestralDiscreteScheduler.from_config(base, use_karras_sigmas=True)
    assert "use_karras_sigmas" not in made.config


def test_scheduler_for_keeps_the_models_training_schedule():
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    own = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                 beta_schedule="scaled_linear", prediction_type="v_prediction",
                                 timestep_spacing="trailing")
    made = scheduler_for(own, "DDIM", None)
    assert isinstance(made, DDIMScheduler)
    for key in ("beta_start", "beta_end", "beta_schedule", "prediction_type", "timestep_spacing"):
        assert made.config[key] == own.config[key], key
    karras = scheduler_for(own, "DPM++ 2M", "Karras")
    assert karras.config["use_karras_sigmas"] is True and karras.config["algorithm_type"] == "dpmsolver++"
    flow = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    assert scheduler_for(flow, "Euler", None).config["shift"] == 3.0
    with pytest.raises(ValueError, match="cannot render"):
        scheduler_for(flow, "DDIM", None)


def test_schedules_name_real_flags():
    import inspect

    from diffusers import EulerDiscreteScheduler

    takes = inspect.signature(EulerDiscreteScheduler.__init__).parameters
    for name, flag in SCHEDULES.items():
        assert flag is None or flag in takes, name
