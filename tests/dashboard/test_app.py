"""The dashboard page itself, run by streamlit's AppTest against a real redis-server holding a realistic farm."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from renderfarm.cluster.keys import Keys
from renderfarm.cluster.redis_server import EmbeddedRedis, connect, free_port
from renderfarm.cluster.store import Store
from renderfarm.jobs import Job, JobSpec, JobState
from tests.dashboard.conftest import png
from tests.dashboard.test_chains import seed_chains
from tests.helpers import put_pngs

pytestmark = pytest.mark.integration

APP = Path(__file__).resolve().parents[2] / "renderfarm" / "dashboard" / "app.py"
TOKEN = "s3cret-dashboard-token"
QUEUE_METRICS = ("Queued", "Waiting (chains)", "Leased", "Running", "Done (1 h)", "Failed (1 h)")


@pytest.fixture
def page(monkeypatch, redis_url, prefix):
    """An AppTest of the page, configured by environment as `renderfarm dashboard` does."""
    monkeypatch.setenv("RENDERFARM_REDIS_URL", redis_url)
    monkeypatch.setenv("RENDERFARM_KEY_PREFIX", prefix)
    monkeypatch.delenv("RENDERFARM_DASHBOARD_TOKEN", raising=False)
    return AppTest.from_file(APP, default_timeout=30)


def queue_metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric if m.label in QUEUE_METRICS}


def texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


def unescape(markdown: str) -> str:
    return re.sub(r"\\(.)", r"\1", markdown)


def node_cards(at: AppTest) -> dict[str, str]:
    """Node name -> the markdown of its card's title line (its colour swatch, name and state badge)."""
    cards = {}
    for element in at.markdown:
        found = re.search(r"\*\*(.+?)\*\* :\w+-badge\[", element.value)
        if found:
            cards[unescape(found.group(1))] = element.value
    return cards


def charts(at: AppTest) -> list[dict]:
    return [json.loads(chart.proto.spec) for chart in at.get("vega_lite_chart")]


def test_page_shows_the_farm(page, seeded):
    at = page.run()
    assert not at.exception
    assert at.title[0].value == "renderfarm"
    assert [h.value for h in at.header] == ["Queue", "Nodes", "Jobs", "Chains", "Gallery"]
    assert queue_metrics(at) == {"Queued": "3", "Waiting (chains)": "0", "Leased": "1", "Running": "2",
                                 "Done (1 h)": "3", "Failed (1 h)": "1"}
    cards = node_cards(at)
    assert set(cards) == {"node-a", "node-b", "node-c"}
    for name, state in seeded.node_states.items():
        assert f"[{state}]" in cards[name], (name, cards[name])
    node_metrics = [(m.label, m.value) for m in at.metric if m.label not in QUEUE_METRICS]
    assert ("VRAM (GiB)", "12.5 / 24.0") in node_metrics and ("Images / min", "60.0") in node_metrics
    assert ("MP / s", "0.25") in node_metrics and ("s / step", "0.050") in node_metrics
    captions = unescape(texts(at.caption))
    assert "NVIDIA GeForce RTX 4090 · real (cuda)" in captions and "GeForce RTX 3070 · simulated (cpu)" in captions
    assert "tiny-flux → fp8-offload" in captions
    assert "RAM: planned against 64.0 GiB (machine: 62.7 GiB, 58.1 free at start)" in captions
    assert "RAM: not planned against" in captions
    jobs, failures = at.dataframe[0].value, at.dataframe[1].value
    assert len(jobs) == sum(seeded.counts.values())
    assert jobs.set_index("id").loc["q2", "ETA"] == "waiting: no node has room for 4096x4096"
    assert list(failures["reason"]) == ["CUDA out of memory at every profile", "model files missing"]
    images = [e for e in at.main if type(e).__name__ == "Image"]
    assert len(images) == 4
    assert "Seed 1007" in captions and "job d1 on node-a" in captions
    assert "read-only" in texts(at.sidebar.caption)
    assert not at.button and [t.key for t in at.text_input] == ["chain_job"], \
        "no actions without a configured token (the chains view's job lookup only reads)"


def test_jobs_filter_shows_queue_positions_and_etas(page, seeded):
    at = page.run()
    at.selectbox(key="filter_state").select("queued").run()
    assert not at.exception
    table = at.dataframe[0].value
    assert list(table["id"]) == ["q0", "q1", "q2"]
    assert list(table["position"].astype(object).where(table["position"].notna(), None)) == [0, 1, None]
    assert table["ETA"].iloc[0].startswith("in ") and table["ETA"].iloc[2].startswith("waiting: ")
    at.selectbox(key="filter_state").select("all").run()
    at.selectbox(key="filter_node").select("node-c").run()
    assert sorted(at.dataframe[0].value["id"]) == ["f1", "r1"]
    at.selectbox(key="filter_team").select("research").run()
    assert list(at.dataframe[0].value["id"]) == ["r1"]


def test_redis_unreachable_reads_as_one_error(monkeypatch, prefix):
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    monkeypatch.setenv("RENDERFARM_REDIS_URL", url)
    monkeypatch.setenv("RENDERFARM_KEY_PREFIX", prefix)
    at = AppTest.from_file(APP, default_timeout=30).run()
    assert not at.exception
    assert len(at.error) == 1
    message = at.error[0].value
    assert message.startswith("Redis unreachable") and "redis://:***@127.0.0.1" in message
    assert "hunter2" not in message and "Retrying" in message
    assert not at.metric and not at.header


def test_settings_from_script_args(monkeypatch, redis_url, seeded):
    monkeypatch.setenv("RENDERFARM_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    monkeypatch.setenv("RENDERFARM_KEY_PREFIX", "elsewhere")
    monkeypatch.setattr("sys.argv", ["app.py", "--redis", redis_url, f"--prefix={seeded.prefix}", "--unknown"])
    at = AppTest.from_file(APP, default_timeout=30).run()
    assert not at.exception and not at.error
    assert queue_metrics(at)["Queued"] == "3"


def test_empty_prefix_says_no_farm_yet(page, redis_client):
    at = page.run()
    assert not at.exception and not at.error
    assert len(at.info) == 1 and at.info[0].value.startswith("No farm yet")
    assert not at.metric


def test_actions_need_the_token(page, monkeypatch, seeded):
    monkeypatch.setenv("RENDERFARM_DASHBOARD_TOKEN", TOKEN)
    at = page.run()
    assert not at.exception
    assert [t.key for t in at.sidebar.text_input] == ["token"] and not at.button
    assert "read-only until" in texts(at.sidebar.caption)

    at.text_input(key="token").input("wrong-token").run()
    assert not at.button and "Wrong token" in texts(at.sidebar.warning)

    at.text_input(key="token").input(TOKEN).run()
    assert not at.exception
    assert {b.key for b in at.sidebar.button} == {"action_cancel", "action_retry", "action_drain", "action_undrain"}

    at.text_input(key="action_job").input("q0").run()
    at.button(key="action_cancel").click().run()
    assert not at.exception
    assert [s.value for s in at.sidebar.success] == ["Cancelled job q0 (was queued)."]
    assert seeded.store.state("q0") is JobState.CANCELLED
    assert queue_metrics(at)["Queued"] == "2", "the page shows the change at once"

    at.text_input(key="action_job").input("d0").run()
    at.button(key="action_retry").click().run()
    assert [e.value for e in at.sidebar.error] == ["Job d0 is done: only failed jobs can be retried."]

    at.text_input(key="action_job").input("f0").run()
    at.button(key="action_retry").click().run()
    assert [s.value for s in at.sidebar.success] == ["Job f0 is queued again."]
    assert seeded.store.state("f0") is JobState.QUEUED

    at.selectbox(key="action_node").select("node-a").run()
    at.button(key="action_drain").click().run()
    assert [s.value for s in at.sidebar.success] == ["Node node-a is draining."]
    assert "[draining]" in node_cards(at)["node-a"]


def test_redis_going_away_reads_as_a_banner_at_once(monkeypatch, prefix, tmp_path):
    """Redis stops under an open page: the next run says so within seconds (it was blank while the client
    retried each read for ~30 s), and the page comes back with Redis."""
    server = EmbeddedRedis(tmp_path / "redis", port=free_port())  # one port: it comes back where it was
    url = server.start()
    try:
        Store(connect(url), Keys(prefix)).register_node("n1", {"state": "idle", "vram_gib": 8})
        monkeypatch.setenv("RENDERFARM_REDIS_URL", url)
        monkeypatch.setenv("RENDERFARM_KEY_PREFIX", prefix)
        at = AppTest.from_file(APP, default_timeout=20).run()
        assert not at.exception and not at.error and "n1" in node_cards(at)
        server.stop()
        started = time.monotonic()
        at.run()
        assert time.monotonic() - started < 10
        assert not at.exception
        assert len(at.error) == 1 and at.error[0].value.startswith("Redis unreachable") and at.error[0].icon
        assert not at.metric and not at.header, "no stale numbers under the banner"
        server.start()
        at.run()
        assert not at.error and "n1" in node_cards(at)
    finally:
        server.stop()


def test_banner_when_no_node_takes_work(page, seeded):
    at = page.run()
    assert not at.warning, "node-a is busy"
    seeded.store.set_draining("node-a", True)
    at.run()
    assert len(at.warning) == 1
    banner = unescape(at.warning[0].value)
    assert banner.startswith("No node takes work") and "node-a draining" in banner and "node-c dead" in banner
    assert "3 queued jobs wait" in banner


def test_charts_use_a_24_hour_clock_and_one_distinct_colour_per_node(page, seeded):
    at = page.run()
    specs = charts(at)
    assert len(specs) == 3, "queue depth, images/min, MP/s"
    for spec in specs:
        x = spec["encoding"]["x"]
        assert x["axis"]["format"] == "%H:%M" and x["scale"]["type"] == "utc", x
    for spec in specs[1:]:
        scale = spec["encoding"]["color"]["scale"]
        assert scale["domain"] == ["node-a", "node-b"]
        assert len(set(scale["range"])) == 2, "two nodes, two colours"
        card_colours = {n: re.search(r'foreground="(#[0-9a-f]{6})"', v).group(1) for n, v in node_cards(at).items()}
        assert dict(zip(scale["domain"], scale["range"])) == {n: card_colours[n] for n in scale["domain"]}


def test_user_text_reaches_markdown_escaped(page, seeded, tmp_path):
    store = seeded.store
    prompt = "![p](http://evil.example/p.png) [click](https://evil.example) <img src=x> $x^2$ :red[red] www.evil.example"
    store.submit([Job(id="evil", spec=JobSpec(model="tiny-sd15", prompt=prompt, width=64, height=64, steps=4,
                                              team="design", seed=5))], "batch-2")
    assert store.lease("evil", "node-a", 300) and store.start("evil", "node-a", 300)
    urls = put_pngs(tmp_path, "evil", [png(prompt, 5)])
    assert store.complete("evil", "node-a", urls, {}, 900.0, profile="fp16-resident")
    store.set_draining("node-b", True, reason="[see](http://evil.example)")
    at = page.run()
    assert not at.exception
    every = [e.value for e in (*at.markdown, *at.caption)]
    shown = [v for v in every if "evil" in v]
    assert len(shown) >= 3, "the prompt, its job id and the drain reason"
    for value in shown:  # no link, image, HTML, LaTeX, colour directive or autolink left
        for drawn in ("](", "![", ":red[", "http://", "https://", "www.evil"):
            assert drawn not in value, (drawn, value)
        assert not re.search(r"(?<!\\)[<$]", value), value
    assert any(unescape(v).startswith("**![p](http://evil.example/p.png) [click]") for v in shown)
    assert "Draining: [see](http://evil.example)" in unescape("\n".join(shown))


def test_a_node_card_shows_the_job_it_renders_and_its_step(page, seeded):
    at = page.run()
    bars = at.get("progress")
    assert len(bars) == 1, "node-a renders; node-b and node-c do not"
    assert unescape(bars[0].proto.text) == "rendering r0 step 12/28"
    assert bars[0].proto.value == int(100 * 12 / 28)


def test_the_chains_view(page, seeded):
    seed_chains(seeded.store, seeded.now)
    at = page.run()
    assert not at.exception and not at.error
    assert "Chains" in [h.value for h in at.header]
    metrics = queue_metrics(at)
    assert (metrics["Queued"], metrics["Waiting (chains)"]) == ("5", "3")
    captions = unescape(texts(at.caption))
    assert "Backlog: 11 jobs not finished: 5 queued (runnable), 3 waiting for the jobs they run after" in captions
    assert "3 jobs wait for others; the first 3 as they would be queued" in captions
    tables = [d.value for d in at.dataframe]
    jobs = tables[0].set_index("id")
    assert jobs.loc["ch-b", "state"] == "waiting" and jobs.loc["ch-b", "ETA"] == "after: ch-a (queued)"
    waiting = next(t for t in tables if "waits for" in t.columns)
    assert list(waiting["id"]) == ["ch-b", "ch-c", "hi"]
    assert list(waiting["waits for"]) == ["ch-a (queued)", "ch-b (waiting)", "hi-base (queued)"]
    assert list(waiting.set_index("id").loc["hi", ["chain", "batch", "size"]]) == ["hires pass", "chains-1", "128x128"]
    ended = next(t for t in tables if "parent" in t.columns and "reason" in t.columns).set_index("id")
    assert set(ended.index) == {"ch-y", "ch-z", "ch-q"}
    assert ended.loc["ch-y", "parent"] == "ch-x" and ended.loc["ch-y", "reason"].startswith("job ch-x it waits for")

    at.text_input(key="chain_job").input("ch-b").run()
    assert not at.exception
    tables = [d.value for d in at.dataframe]
    parents = next(t for t in tables if "parent" in t.columns and "reason" not in t.columns)
    kids = next(t for t in tables if "child" in t.columns)
    assert list(zip(parents["parent"], parents["state"])) == [("ch-a", "queued")]
    assert list(zip(kids["child"], kids["state"])) == [("ch-c", "waiting")]
    assert "**ch\\-b** waiting" in texts(at.markdown)

    at.text_input(key="chain_job").input("ch-x").run()
    kids = next(d.value for d in at.dataframe if "child" in d.value.columns)
    assert list(zip(kids["child"], kids["state"], kids["ended by it"])) == [("ch-y", "failed", True)]
    assert "Runs after no job." in texts(at.caption)

    at.text_input(key="chain_job").input("nope").run()
    assert not at.exception and "No job nope" in unescape(texts(at.caption))
