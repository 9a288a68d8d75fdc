"""`renderfarm plan`: which profile a node with this card would choose for a job, and why. Pure planning:
no farm needed."""

from __future__ import annotations

import argparse
from pathlib import Path

from renderfarm.cli.common import EXIT_ERROR, emit, parse_size, settings_from
from renderfarm.errors import CliError

DEFAULT_PLAN_CC = "8.6"  # `plan` without --gpu or --compute-capability: an Ampere card

def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser,
             with_redis: argparse.ArgumentParser) -> None:
    plan = sub.add_parser("plan", parents=[common], help="which profile a card would choose for a job")
    plan.add_argument("--model", required=True)
    plan.add_argument("--vram", type=float, required=True, metavar="GIB", help="the card's VRAM in GiB")
    plan.add_argument("--size", type=parse_size, help="WIDTHxHEIGHT (default: the model's)")
    plan.add_argument("--batch", type=int, default=1, help="images rendered together")
    plan.add_argument("--compute-capability", metavar="X.Y",
                      help=f"e.g. 7.5 (Turing), 8.9 (Ada) (default: the --gpu card's, else {DEFAULT_PLAN_CC})")
    plan.add_argument("--gpu", help="card name, e.g. 'Quadro RTX 6000' (its figures refine the estimate)")
    plan.add_argument("--margin", type=float, default=0.5, metavar="GIB", help="VRAM kept free (default 0.5)")
    plan.add_argument("--ram", type=float, metavar="GIB",
                      help="the machine's RAM: profiles whose host memory exceeds it are not chosen "
                           "(default: not checked)")
    plan.add_argument("--steps", type=int, metavar="N", help="denoising steps per job (default: the model's)")
    plan.add_argument("--task", choices=("txt2img", "img2img", "inpaint"), default="txt2img",
                      help="what the job renders: img2img and inpaint add the VAE encode of the init image "
                           "(default txt2img)")
    plan.add_argument("--lora", action="append", default=[], metavar="NAME:WEIGHT",
                      help="a LoRA of the library applied (repeat for several; weight 1 when left out): shows the "
                           "mode the card applies them in and what they cost")
    plan.add_argument("--lora-dir", type=Path, metavar="PATH", help="the LoRA library (default: the lora_dir setting)")
    plan.set_defaults(func=cmd_plan)


DEFAULT_PLAN_CC = "8.6"  # `plan` without --gpu or --compute-capability: an Ampere card


def cmd_plan(args: argparse.Namespace) -> int:
    """What a node with this card would choose for a job, and why: pure planning, no farm needed."""
    from renderfarm.planning.catalog import default_catalog
    from renderfarm.planning.choose import choose_profile, plan_report
    from renderfarm.planning.devices import device_from_spec, known_card

    settings = settings_from(args)
    entry = default_catalog(settings.models_file).get(args.model)
    width, height = args.size or (entry.default_size, entry.default_size)
    card = known_card(args.gpu, args.vram) if args.gpu else None
    cc = args.compute_capability or (card.compute_capability if card else DEFAULT_PLAN_CC)
    if args.ram is not None and args.ram <= 0:
        raise CliError(f"--ram: must be positive (the machine's RAM in GiB), got {args.ram:g}")
    if args.batch < 1:
        raise CliError(f"--batch: must be at least 1, got {args.batch}")
    try:
        device = device_from_spec(args.gpu or f"{args.vram:g} GiB card", args.vram, cc, ram_gib=args.ram)
    except ValueError as exc:  # a bad --vram or --compute-capability: the device says which and why
        raise CliError(str(exc)) from None
    report = plan_report(entry, device, width, height, args.batch, args.margin, steps=args.steps, task=args.task)
    choice = choose_profile(entry, device, width, height, args.batch, args.margin, steps=args.steps, task=args.task)
    loras = _lora_report(args, settings, entry, choice) if args.lora else None
    if args.json:
        emit(args, {"ok": True, **report, **({"loras": loras} if loras is not None else {})})
    else:
        print(choice.explain())
        if loras is not None:
            print(_lora_text(loras))
    return 0 if report["chosen"] else EXIT_ERROR


def _lora_report(args: argparse.Namespace, settings, entry, choice) -> dict:
    """The LoRAs of --lora from the library, and what they cost the chosen profile (planning/loras.py)."""
    from renderfarm.jobs import LoraRef
    from renderfarm.loras.assets import library_for
    from renderfarm.loras.library import LoraError
    from renderfarm.planning.loras import lora_cost

    library = library_for(settings, args.lora_dir)
    chosen = []
    for text in args.lora:
        name, _, weight = text.partition(":")
        try:
            ref = LoraRef(name=name, weight=float(weight) if weight else 1.0)
            info = library.get(ref.name)
        except (ValueError, LoraError) as exc:
            raise CliError(f"--lora {text}: {str(exc).splitlines()[0]}") from None
        if info.family != entry.family.name:
            raise CliError(f"--lora {text}: LoRA {info.name!r} is made for {info.family} models, "
                           f"not {entry.family.name}")
        chosen.append((info, ref.weight))
    profile = choice.chosen
    cost = lora_cost(entry, profile, chosen)
    chosen_candidate = next((c for c in choice.candidates if profile is not None and c.profile == profile), None)
    per_step = chosen_candidate.prediction.seconds_per_step if chosen_candidate is not None else None
    return {"profile": profile.name if profile else None,
            "loras": [{"name": i.name, "weight": w, "rank": i.rank, "size_bytes": i.size_bytes,
                       "short_hash": i.short_hash} for i, w in chosen],
            **cost.as_dict(),
            "seconds_per_step": round(per_step * cost.step_factor, 3) if per_step is not None else None}


def _lora_text(report: dict) -> str:
    names = ", ".join(f"{lo['name']}:{lo['weight']:g}" for lo in report["loras"])
    lines = [f"LoRAs {names} on {report['profile'] or 'no profile'}: {report['mode']} ({report['reason']})",
             f"  step x{report['step_factor']:.3f}"
             + (f" ({report['seconds_per_step']:.3f} s/step)" if report["seconds_per_step"] is not None else "")
             + f", +{report['device_gib']:.2f} GiB on the card, +{report['host_gib']:.2f} GiB host backup, "
             f"a switch to them ~{report['switch_s']:.2f} s"]
    return "\n".join(lines)
