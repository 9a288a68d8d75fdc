import json

import pytest

from renderfarm.cli import main
from renderfarm.errors import ConfigError
from renderfarm.scheduler.simulate import EXACT, POLICIES, PredictionError, load_cluster, load_trace, run_sim

CLUSTER = """
nodes:
  - {name: big, gpu: GeForce RTX 3090, vram_gib: 24, compute_capability: "8.6"}
  - {name: small, gpu: GeForce RTX 3070, vram_gib: 8, compute_capability: "8.6", count: 2}
"""


def write(tmp_path, jobs, cluster=CLUSTER):
    trace, nodes = tmp_path / "trace.jsonl", tmp_path / "cluster.yaml"
    trace.write_text("\n".join(json.dumps(j) for j in jobs) + "\n")
    nodes.write_text(cluster)
    return trace, nodes


def job(model, size, images=1, steps=20, at=0.0):
    return {"model": model, "width": size, "height": size, "steps": steps, "num_images": images, "submit_s": at}


MIXED = [job("sd15", 512, at=i * 2.0) for i in range(6)] + [job("sdxl", 1024, 2, at=3.0 + i) for i in range(4)]
# Big Flux jobs fit only the 24 GiB card; SDXL x8 at 1 Mpx is within an 8 GiB card's pixel limit but not its memory.
BIG = [job("flux-dev", 2048, 4, steps=8, at=float(i)) for i in range(4)] + [job("sdxl", 1024, 8, at=0.5)]


def test_cluster_counts_expand_to_named_nodes(tmp_path):
    _, nodes = write(tmp_path, MIXED)
    assert [n.name for n in load_cluster(nodes)] == ["big", "small-0", "small-1"]


def test_simulation_is_deterministic_and_reports_every_policy(tmp_path):
    trace, nodes = write(tmp_path, MIXED)
    first, second = run_sim(trace, nodes), run_sim(trace, nodes)  # the same seed: the same truth
    assert first == second
    assert set(first["policies"]) == set(POLICIES)
    for figures in first["policies"].values():
        assert set(figures) >= {"makespan_s", "p50_wait_s", "p95_wait_s", "utilization", "ooms", "model_loads"}
        assert figures["makespan_s"] >= first["lower_bound_s"] > 0
        assert 0 < figures["utilization"] <= 1
    assert first["rejected"] == 0


def test_renderfarm_never_ooms_where_the_baselines_do(tmp_path):
    trace, nodes = write(tmp_path, BIG)
    result = run_sim(trace, nodes)["policies"]
    assert result["renderfarm"]["ooms"] == 0
    assert result["least-busy"]["ooms"] > 0
    assert result["max-pixels-fifo"]["ooms"] > 0


def test_jobs_that_fit_no_node_are_rejected_up_front(tmp_path):
    only_small = 'nodes:\n  - {name: s, gpu: GeForce RTX 3070, vram_gib: 8, compute_capability: "8.6", count: 2}\n'
    trace, nodes = write(tmp_path, [job("flux-dev", 2048, 4), job("sd15", 512)], only_small)
    result = run_sim(trace, nodes)
    assert result["rejected"] == 1
    assert all(p["ooms"] == 0 for p in result["policies"].values())


def test_bad_cluster_file_is_an_error(tmp_path):
    trace, nodes = write(tmp_path, MIXED, "nodes: []\n")
    with pytest.raises(ValueError, match="nodes"):
        run_sim(trace, nodes)


# --- prediction error: the policies plan with the prediction, the simulation runs with the truth -----------


def test_exact_knowledge_draws_every_factor_at_one(tmp_path):
    trace, _ = write(tmp_path, MIXED)
    assert set(EXACT.factors(load_trace(trace)).values()) == {1.0}


def test_uniform_factors_stay_within_the_spread_and_follow_the_seed(tmp_path):
    trace, _ = write(tmp_path, MIXED * 20)
    jobs = load_trace(trace)
    factors = PredictionError(0.3, "uniform", seed=1).factors(jobs)
    assert len(factors) == len(jobs)
    assert all(0.7 <= f <= 1.3 for f in factors.values())
    assert min(factors.values()) < 0.8 and max(factors.values()) > 1.2  # the spread is used, not just allowed
    assert factors == PredictionError(0.3, "uniform", seed=1).factors(jobs)
    assert factors != PredictionError(0.3, "uniform", seed=2).factors(jobs)


def test_lognormal_factors_centre_on_one(tmp_path):
    trace, _ = write(tmp_path, MIXED * 40)
    factors = sorted(PredictionError(0.3, "lognormal").factors(load_trace(trace)).values())
    median = factors[len(factors) // 2]
    assert 0.9 < median < 1.1
    assert factors[0] > 0 and factors[-1] > 1.3  # unbounded above, unlike the uniform draw


def test_a_job_runs_for_its_true_duration_not_its_predicted_one(tmp_path):
    one = [job("sd15", 512)]
    trace, nodes = write(tmp_path, one, 'nodes:\n  - {name: a, gpu: GeForce RTX 3090, vram_gib: 24, '
                                        'compute_capability: "8.6"}\n')
    error = PredictionError(0.3, seed=3)
    factor = error.factors(load_trace(trace))[0]
    assert factor != 1.0
    exact, noisy = run_sim(trace, nodes, EXACT), run_sim(trace, nodes, error)
    for policy in POLICIES:
        predicted = exact["policies"][policy]["makespan_s"]
        assert noisy["policies"][policy]["makespan_s"] == pytest.approx(predicted * factor, abs=0.1)
    assert noisy["lower_bound_parts"]["longest_job_s"] == pytest.approx(
        exact["lower_bound_parts"]["longest_job_s"] * factor, abs=0.1)
    assert noisy["prediction_error"] == {"spread": 0.3, "distribution": "uniform", "seed": 3}


def test_error_changes_what_the_policy_meets_and_every_policy_still_reports_its_waits(tmp_path):
    trace, nodes = write(tmp_path, MIXED)
    exact, noisy = run_sim(trace, nodes, EXACT), run_sim(trace, nodes, PredictionError(0.3, seed=0))
    assert exact["policies"] != noisy["policies"]
    for figures in noisy["policies"].values():
        assert figures["makespan_s"] >= noisy["lower_bound_s"] > 0
        assert figures["p95_wait_s"] >= figures["p50_wait_s"] >= 0


@pytest.mark.parametrize("spread, distribution, words", [
    (1.0, "uniform", "below 1"), (-0.1, "uniform", ">= 0"), (float("nan"), "lognormal", "finite"),
    (0.3, "gauss", "expected one of"),
])
def test_bad_prediction_error_is_refused_naming_it(spread, distribution, words):
    with pytest.raises(ConfigError, match=words):
        PredictionError(spread, distribution)


def test_bench_sim_command_takes_the_error_and_refuses_a_bad_one(capsys, tmp_path):
    trace, nodes = write(tmp_path, MIXED)
    base = ["bench", "sim", "--trace", str(trace), "--cluster", str(nodes)]
    assert main([*base, "--error", "0.2", "--error-dist", "lognormal", "--seed", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["prediction_error"] == {"spread": 0.2, "distribution": "lognormal", "seed": 4}
    assert report == {"ok": True, **run_sim(trace, nodes, PredictionError(0.2, "lognormal", 4))}
    assert main([*base, "--error", "1.5"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "error spread 1.5" in err
