"""`renderfarm plan`: pure planning from the command line (no Redis, no Ray, no torch)."""

import json
import subprocess
import sys

from renderfarm.cli import main


def plan(capsys, *args):
    code = main(["plan", *args, "--json"])
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1, out
    return code, json.loads(out[0])


def chosen(report):
    return next(c for c in report["candidates"] if c["name"] == report["chosen"])


def test_80_gib_runs_flux_in_bf16_all_on_the_gpu(capsys):
    code, report = plan(capsys, "--model", "flux-dev", "--vram", "80", "--size", "1024x1024")
    assert code == 0
    c = chosen(report)
    assert (c["weights"], c["compute_dtype"], c["placement"], c["fits"]) == ("bf16", "bf16", "gpu", True)
    for key in ("name", "weights", "compute_dtype", "placement", "vae", "predicted_peak_gib", "fits"):
        assert all(key in cand for cand in report["candidates"])


def test_8_gib_chooses_a_profile_predicted_under_8_gib(capsys):
    code, report = plan(capsys, "--model", "flux-dev", "--vram", "8", "--size", "1024x1024")
    assert code == 0
    assert chosen(report)["predicted_peak_gib"] < 8
    assert any(not c["fits"] for c in report["candidates"]), "bf16 all-GPU cannot fit 8 GiB"


def test_turing_computes_in_fp16(capsys):
    _, report = plan(capsys, "--model", "flux-dev", "--vram", "24", "--compute-capability", "7.5")
    assert {c["compute_dtype"] for c in report["candidates"]} == {"fp16"}
    assert report["device"]["bf16_native"] is False


def test_nothing_fits_exits_non_zero_with_the_reason(capsys):
    code, report = plan(capsys, "--model", "flux-dev", "--vram", "1", "--size", "2048x2048", "--batch", "4")
    assert code == 1 and report["chosen"] is None and "nothing fits" in report["reason"]


def test_human_output_marks_the_choice_and_bad_input_is_one_line(capsys):
    assert main(["plan", "--model", "sdxl", "--vram", "8"]) == 0
    out = capsys.readouterr().out
    assert "chosen:" in out and "fits" in out
    assert main(["plan", "--model", "sd9", "--vram", "8"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "known models" in err


def test_plan_needs_no_torch_ray_or_diffusers():
    code = subprocess.run(
        [sys.executable, "-c",
         "import sys; from renderfarm.cli import main; main(['plan','--model','flux-dev','--vram','12','--json']);"
         "print([m for m in ('torch','ray','diffusers') if m in sys.modules], file=sys.stderr)"],
        capture_output=True, text=True, timeout=60,
    )
    assert code.returncode == 0 and code.stderr.strip().endswith("[]"), code.stderr


def test_bench_sim_json_reports_every_policy_and_the_bound(capsys):
    assert main(["bench", "sim", "--json"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1
    report = json.loads(out[0])
    assert set(report["policies"]) == {"renderfarm", "least-busy", "max-pixels-fifo"}
    for policy in report["policies"].values():
        assert {"makespan_s", "p95_wait_s", "ooms", "model_loads"} <= set(policy)
        assert policy["makespan_s"] >= report["lower_bound_s"] > 0
    assert report["policies"]["renderfarm"]["ooms"] == 0  # never sent where it is predicted not to fit


def test_bench_sim_missing_trace_is_one_clear_line(capsys, tmp_path):
    assert main(["bench", "sim", "--trace", str(tmp_path / "none.jsonl")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "none.jsonl" in err


def test_ram_shows_host_memory_and_refuses_what_the_machine_cannot_hold(capsys):
    code, report = plan(capsys, "--model", "flux-dev", "--gpu", "RTX 3070", "--vram", "7.6", "--ram", "16")
    assert code == 0 and report["device"]["ram_gib"] == 16
    assert report["host_usable_gib"] == 12.5 and report["steps"] == 28
    c = chosen(report)
    assert c["host_peak_gib"] <= report["host_usable_gib"] and c["predicted_peak_gib"] <= 7.1
    assert {"host_gib", "host_peak_gib", "pinned_gib", "stage_peaks_gib", "seconds_per_job"} <= set(c)
    assert c["stage_peaks_gib"]["load"] <= c["predicted_peak_gib"]
    refused = [x for x in report["candidates"] if "host RAM" in x["reason"]]
    assert refused and all(not x["fits"] and x["host_peak_gib"] > 12.5 for x in refused)
    # without --ram nothing is refused for host memory
    _, unchecked = plan(capsys, "--model", "flux-dev", "--gpu", "RTX 3070", "--vram", "7.6")
    assert unchecked["host_usable_gib"] is None
    assert not any("host RAM" in x["reason"] for x in unchecked["candidates"])


def test_human_plan_shows_both_memory_columns(capsys):
    assert main(["plan", "--model", "flux-dev", "--vram", "24", "--gpu", "Quadro RTX 6000", "--ram", "64"]) == 0
    out = capsys.readouterr().out
    assert "VRAM GiB" in out and "host GiB" in out and "s/job" in out and "RAM 64 GiB" in out
    assert "chosen: nf4:" in out and "predicted fastest" in out


def test_bad_ram_is_one_line(capsys):
    assert main(["plan", "--model", "flux-dev", "--vram", "8", "--ram", "-4"]) != 0
    err = capsys.readouterr().err
    assert "--ram: must be positive" in err and "Traceback" not in err
