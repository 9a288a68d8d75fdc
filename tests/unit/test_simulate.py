import json

import pytest

from renderfarm.scheduler.simulate import POLICIES, load_cluster, run_sim

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
    first, second = run_sim(trace, nodes), run_sim(trace, nodes)
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
