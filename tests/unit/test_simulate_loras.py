"""LoRAs in the simulator: adapter switches counted and paid, the renderfarm policy routing by applied sets."""

import json

import pytest

from renderfarm.cli import main
from renderfarm.errors import ConfigError
from renderfarm.scheduler.placement import lora_switch_seconds
from renderfarm.scheduler.simulate import (
    DEFAULT_LORA_TRACE,
    DEFAULT_TRACE,
    EXACT,
    POLICIES,
    load_cluster,
    load_trace,
    run_policy,
    run_sim,
)

ONE_NODE = 'nodes:\n  - {name: a, gpu: GeForce RTX 3090, vram_gib: 24, compute_capability: "8.6"}\n'
TWO_NODES = 'nodes:\n  - {name: a, gpu: GeForce RTX 3090, vram_gib: 24, compute_capability: "8.6", count: 2}\n'
MIXED_CLUSTER = """
nodes:
  - {name: big, gpu: GeForce RTX 3090, vram_gib: 24, compute_capability: "8.6"}
  - {name: small, gpu: GeForce RTX 3070, vram_gib: 8, compute_capability: "8.6", count: 2}
"""


def write(tmp_path, jobs, cluster, name="trace.jsonl"):
    trace, nodes = tmp_path / name, tmp_path / "cluster.yaml"
    trace.write_text("\n".join(json.dumps(j) for j in jobs) + "\n")
    nodes.write_text(cluster)
    return trace, nodes


def job(model, at, *loras, size=512, steps=20, images=1):
    out = {"model": model, "width": size, "height": size, "steps": steps, "num_images": images, "submit_s": at}
    if loras:
        out["loras"] = [{"name": name, "weight": 0.8} for name in loras]
    return out


def without_loras(jobs):
    return [{k: v for k, v in j.items() if k != "loras"} for j in jobs]


# One node, jobs queued back to back: what its pipeline has applied before each, and whether it switches.
BY_HAND = [
    job("sd15", 0.0),  # load sd15, nothing to apply: no switch
    job("sd15", 0.1, "ink"),  # () -> (ink): switch 1
    job("sd15", 0.2, "ink"),  # (ink) -> (ink): none
    job("sd15", 0.3, "grain", "ink"),  # (ink) -> (grain, ink): switch 2
    job("sd15", 0.4),  # (grain, ink) -> (): switch 3 (unloading is a switch)
    job("sdxl", 0.5, "xl-ink", size=1024),  # load sdxl, then apply: switch 4
    job("sd15", 0.6, "ink"),  # load sd15 again (fresh, nothing applied), apply: switch 5
]
INK, GRAIN = ("ink", None, 0.8), ("grain", None, 0.8)
BY_HAND_SWITCH_S = (lora_switch_seconds((), (INK,)) + lora_switch_seconds((INK,), (GRAIN, INK))
                    + lora_switch_seconds((GRAIN, INK), ()) + 2 * lora_switch_seconds((), (("x", None, 0.8),)))


def test_switches_are_counted_by_hand_on_one_node(tmp_path):
    trace, nodes = write(tmp_path, BY_HAND, ONE_NODE)
    report = run_sim(trace, nodes, EXACT)
    assert report["lora_jobs"] == 5 and report["lora_sets"] == 3
    for policy in POLICIES:  # one node: every policy runs them in the same order
        assert report["policies"][policy]["lora_switches"] == 5, policy
        assert report["policies"][policy]["model_loads"] == 3, policy
        stats = run_policy(load_cluster(nodes), load_trace(trace), policy, EXACT)
        assert (stats.lora_switches, stats.lora_switches_on_load) == (5, 2), policy  # the sdxl job, the sd15 reload


def test_a_switch_costs_what_the_planner_predicts(tmp_path):
    """The node never idles, so the makespan grows by exactly the switches' seconds (exact knowledge)."""
    trace, nodes = write(tmp_path, BY_HAND, ONE_NODE)
    plain, _ = write(tmp_path, without_loras(BY_HAND), ONE_NODE, "plain.jsonl")
    with_loras, without = run_sim(trace, nodes, EXACT), run_sim(plain, nodes, EXACT)
    assert BY_HAND_SWITCH_S == pytest.approx(5.5)
    for policy in POLICIES:
        grown = with_loras["policies"][policy]["makespan_s"] - without["policies"][policy]["makespan_s"]
        assert grown == pytest.approx(BY_HAND_SWITCH_S, abs=0.11), policy
        assert without["policies"][policy]["lora_switches"] == 0


def test_the_renderfarm_policy_sends_a_job_to_the_node_with_its_set_applied(tmp_path):
    """Two idle twins, one with (ink) applied, one with (grain): the live score sends an (grain) job to the
    second; least-busy and FIFO take the first listed node and switch."""
    jobs = [job("sd15", 0.0, "ink"), job("sd15", 0.0, "grain"), job("sd15", 300.0, "grain")]
    trace, nodes = write(tmp_path, jobs, TWO_NODES)
    report = run_sim(trace, nodes, EXACT)["policies"]
    assert report["renderfarm"]["lora_switches"] == 2  # each node applies its first set, then no more
    assert report["least-busy"]["lora_switches"] == 3
    assert report["max-pixels-fifo"]["lora_switches"] == 3


def test_loras_absent_or_empty_give_the_same_figures(tmp_path):
    jobs = [job("sd15", i * 2.0) for i in range(6)] + [job("sdxl", 3.0 + i, size=1024, images=2) for i in range(4)]
    trace, nodes = write(tmp_path, jobs, MIXED_CLUSTER)
    absent = run_sim(trace, nodes)
    trace.write_text("\n".join(json.dumps({**j, "loras": []}) for j in jobs) + "\n")
    assert run_sim(trace, nodes) == absent
    assert absent["lora_jobs"] == 0 and all(p["lora_switches"] == 0 for p in absent["policies"].values())


def test_the_lora_trace_is_the_shipped_trace_plus_loras_on_a_third_of_its_jobs():
    plain, loras = load_trace(DEFAULT_TRACE), load_trace(DEFAULT_LORA_TRACE)
    assert [(j.submit_s, j.shape.model, j.shape.width, j.shape.height, j.shape.steps, j.shape.num_images)
            for j in loras] == [(j.submit_s, j.shape.model, j.shape.width, j.shape.height, j.shape.steps,
                                 j.shape.num_images) for j in plain]
    carrying = [j for j in loras if j.shape.loras]
    assert len(carrying) == round(len(loras) / 3)
    assert all(len(j.shape.loras) == 1 for j in carrying)
    assert len({j.shape.loras[0][0] for j in carrying}) == 10
    # each LoRA made for its job's family (an SDXL LoRA on Flux is refused at submit)
    assert all(j.shape.loras[0][0].startswith({"flux-dev": "flux", "flux-schnell": "flux"}.get(
        j.shape.model, j.shape.model)) for j in carrying)


def test_every_policy_reports_its_switches_on_the_lora_trace():
    report = run_sim(DEFAULT_LORA_TRACE)
    assert report["jobs"] == 500 and report["lora_jobs"] == 167 and report["lora_sets"] == 10
    assert report["rejected"] == 0  # every node holds every LoRA
    for policy in POLICIES:
        figures = report["policies"][policy]
        # each set is applied at least once; a job switches at most once
        assert 10 <= figures["lora_switches"] <= 500, policy
        assert figures["makespan_s"] >= report["lower_bound_s"] > 0
        assert figures["p95_wait_s"] >= figures["p50_wait_s"] >= 0


@pytest.mark.parametrize("loras, words", [
    ('[{"weight": 1}]', "name"), ('[{"name": "a", "weight": "NaN"}]', "finite"),
    ('[{"name": "a"}, {"name": "a"}]', "twice"), ('"a"', "list"),
])
def test_a_bad_lora_in_the_trace_is_refused_naming_the_line(tmp_path, loras, words):
    trace = tmp_path / "trace.jsonl"
    bad = json.dumps(job("sd15", 1.0))[:-1] + f', "loras": {loras}}}'
    trace.write_text(json.dumps(job("sd15", 0.0)) + "\n" + bad + "\n")
    with pytest.raises(ConfigError, match=rf"trace.jsonl:2: bad job .*{words}"):
        load_trace(trace)


def test_bench_sim_lora_trace_prints_the_switches(capsys):
    assert main(["bench", "sim", "--lora-trace", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == {"ok": True, **run_sim(DEFAULT_LORA_TRACE)}
    assert main(["bench", "sim", "--lora-trace"]) == 0
    table = capsys.readouterr().out
    assert "switches" in table and "LoRA jobs: 167" in table
    assert main(["bench", "sim", "--lora-trace", "--trace", str(DEFAULT_TRACE)]) == 1
    assert "give one trace" in capsys.readouterr().err
