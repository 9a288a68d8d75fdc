"""The renderfarm dashboard: `renderfarm dashboard` runs it (`streamlit run renderfarm/dashboard/app.py`).

It reads Redis only (through `queries`), never Ray, so it runs anywhere the Redis URL reaches. Settings:
`-- --redis URL --prefix PREFIX` after the script, else RENDERFARM_REDIS_URL (default
redis://127.0.0.1:6379/0) and RENDERFARM_KEY_PREFIX (default rf). The write actions (cancel, retry, drain)
appear only once a token is entered in the sidebar: RENDERFARM_DASHBOARD_TOKEN (environment only, never argv),
or, on a farm in token mode, an admin team token (cluster/auth.py; team tokens are not enough).

The live part is one fragment that reruns every 2 s on its own (the page around it stays put), reading only
what it shows: counts from the state indexes, the latest rows per state, the first image of the latest
done jobs (cached: a finished job's result never changes), and the chains: the jobs that wait for others, the
jobs a parent ended, one job's parents and children (`chains`).
"""

from __future__ import annotations

import hmac
import os
import sys
import time
from typing import Any

import altair as alt
import pandas as pd
import redis
import streamlit as st

from renderfarm.cluster import auth
from renderfarm.cluster.keys import DEFAULT_PREFIX, Keys
from renderfarm.cluster.redis_server import redact
from renderfarm.cluster.redis_settings import RedisSettings
from renderfarm.cluster.store import Store
from renderfarm.config import ConfigError, Settings
from renderfarm.dashboard import chains, queries
from renderfarm.dashboard.text import md
from renderfarm.errors import RedisUnavailable
from renderfarm.jobs import JobState

DEFAULT_URL = "redis://127.0.0.1:6379/0"
REFRESH_S = 2
MIN_TOKEN = 8  # RENDERFARM_DASHBOARD_TOKEN, environment only (never in a settings file others may read)
ALL = "all"
STATE_COLORS = {"idle": "green", "busy": "blue", "draining": "orange", "dead": "red", "stopped": "gray"}
TAKES_WORK = ("idle", "busy")  # a node in any other state (draining, dead, stopped, unknown) takes no new job
TIME_FORMAT = "%H:%M"  # 24-hour clock: the axis says "time (UTC)" and has no room for AM/PM
UNREACHABLE = (RedisUnavailable, redis.ConnectionError, redis.TimeoutError, OSError)


# --- settings ----------------------------------------------------------------------------------------


def option(argv: list[str], name: str) -> str | None:
    """The value of `--name VALUE` or `--name=VALUE` in `argv`; anything else there is ignored (streamlit
    run and AppTest pass different argv)."""
    for i, arg in enumerate(argv):
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return None


def page_settings() -> dict[str, Any]:
    argv = sys.argv[1:]
    url = option(argv, "redis") or os.environ.get("RENDERFARM_REDIS_URL") or DEFAULT_URL
    prefix = option(argv, "prefix") or os.environ.get("RENDERFARM_KEY_PREFIX") or DEFAULT_PREFIX
    token = os.environ.get("RENDERFARM_DASHBOARD_TOKEN") or None
    short = token is not None and len(token) < MIN_TOKEN
    try:
        dead_after = Settings.load().dead_after_seconds
    except ConfigError:  # another RENDERFARM_* variable is invalid: the dashboard still runs
        dead_after = Settings().dead_after_seconds
    return {"url": url, "prefix": prefix, "token": None if short else token, "short_token": short,
            "dead_after": dead_after}


@st.cache_resource(show_spinner=False)
def open_store(url: str, prefix: str) -> Store:
    """One Redis client per URL and prefix for every session (a failed connect is not cached: retried).

    No retries: the farm's policy (about 30 s of retrying per command, to ride out a Redis restart) would hold
    every read of a page whose Redis went away for minutes, and the page stays blank meanwhile. The page
    retries by itself, every REFRESH_S, and says that Redis is unreachable in between."""
    return Store.open(RedisSettings.from_url(url, socket_timeout=2.0, retry_attempts=0), Keys(prefix))


@st.cache_data(max_entries=64, show_spinner=False)
def gallery_entry(url: str, prefix: str, job_id: str) -> dict[str, Any] | None:
    return queries.gallery_entry(open_store(url, prefix), job_id)


# --- formatting ----------------------------------------------------------------------------------------


def duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def number(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def times(rows: list[dict[str, Any]]) -> pd.DatetimeIndex:
    return pd.to_datetime([r["t"] for r in rows], unit="s", utc=True)


def time_chart(frame: pd.DataFrame, value: str, series: str, y_label: str,
               colors: dict[str, str] | None = None) -> alt.Chart:
    """Lines of `value` over `frame["t"]`, one per `series`, on a 24-hour UTC time axis; `colors` fixes
    each series' colour (else the theme's palette)."""
    color = alt.Color(f"{series}:N", title=None, legend=alt.Legend(orient="bottom"))
    if colors:
        color = alt.Color(f"{series}:N", title=None, legend=alt.Legend(orient="bottom"),
                          scale=alt.Scale(domain=list(colors), range=list(colors.values())))
    return alt.Chart(frame).mark_line().encode(
        x=alt.X("t:T", title="time (UTC)", scale=alt.Scale(type="utc"),
                axis=alt.Axis(format=TIME_FORMAT, formatType="utc")),
        y=alt.Y(f"{value}:Q", title=y_label),
        color=color,
        tooltip=[alt.Tooltip("t:T", title="time (UTC)", format=f"{TIME_FORMAT}:%S", formatType="utc"),
                 alt.Tooltip(f"{series}:N"), alt.Tooltip(f"{value}:Q", format=",.2f")],
    ).properties(height=200)


# --- sections ------------------------------------------------------------------------------------------


def queue_section(view: dict[str, Any]) -> None:
    st.header("Queue")
    counts = view["overview"]
    columns = st.columns(6)
    for column, (label, key) in zip(columns, [
        ("Queued", "queued"), ("Waiting (chains)", "waiting"), ("Leased", "leased"), ("Running", "running"),
        ("Done (1 h)", "done_1h"), ("Failed (1 h)", "failed_1h"),
    ]):
        column.metric(label, f"{counts[key]:,}")
    st.caption(
        f"Backlog: {counts['backlog']:,} jobs not finished: {counts['queued']:,} queued (runnable), "
        f"{counts['waiting']:,} waiting for the jobs they run after (in no queue until those are done), "
        f"{counts['leased'] + counts['running']:,} leased or running. "
        f"{counts['total']:,} jobs in Redis: {counts['done']:,} done, {counts['failed']:,} failed, "
        f"{counts['cancelled']:,} cancelled ({counts['cancelled_1h']:,} in the last hour). Recovered from: "
        f"{counts['leases_expired']:,} expired leases, {counts['timeouts']:,} renders past their time limit; "
        f"{counts['late_results']:,} late results discarded, {counts['quarantined']:,} malformed records quarantined."
    )
    history = queries.queue_history(view["samples"])
    if len(history) < 2:
        st.caption("Queue depth over time appears once the scheduler has written a few samples.")
        return
    frame = pd.DataFrame(history).assign(t=times(history)).melt(id_vars="t", var_name="state", value_name="jobs")
    st.altair_chart(time_chart(frame, "jobs", "state", "jobs"), width="stretch")


def progress_text(node: dict[str, Any]) -> str | None:
    """"rendering JOB step 12/28" (with how many more jobs its batch holds), or None when it renders nothing."""
    if node["current_job"] is None or node["state"] not in ("busy", "draining"):
        return None
    more = f" (+{node['batch_jobs'] - 1} more in its batch)" if node["batch_jobs"] > 1 else ""
    step = f"step {node['step']}/{node['steps']}" if node["step"] and node["steps"] else "starting"
    return f"rendering {node['current_job']}{more} {step}"


def node_card(node: dict[str, Any], color: str | None = None) -> None:
    with st.container(border=True):
        state = node["state"]
        swatch = f':color[■]{{foreground="{color}"}} ' if color else ""  # its colour in the charts
        st.markdown(f"{swatch}**{md(node['name'])}** :{STATE_COLORS.get(state, 'gray')}-badge[{md(state)}]")
        device = f" ({md(node['device'])})" if node["device"] else ""
        st.caption(f"{md(node['gpu'])} · {node['kind']}{device}")
        rendering = progress_text(node)
        if rendering:
            fraction = node["step"] / node["steps"] if node["step"] and node["steps"] else 0.0
            st.progress(min(1.0, max(0.0, fraction)), text=md(rendering))
        used, total = node["vram_used_gib"], node["vram_total_gib"]
        left, right = st.columns(2)
        left.metric("VRAM (GiB)", f"{number(used)} / {number(total)}")
        right.metric("Images / min", number(node["images_per_min"]))
        left.metric("MP / s", number(node["mp_per_s"], 2))
        right.metric("s / step", number(node["s_per_step"], 3))
        heartbeat = node["heartbeat_age_s"]
        lines = [
            f"Last heartbeat: {'never' if heartbeat is None else duration(heartbeat) + ' ago'}",
            f"Loaded: {md(', '.join(node['loaded'])) or 'nothing'}",
            f"Models held: {md(', '.join(node['models'])) or 'none reported'}",
            f"LoRAs: {md(', '.join(node['loras'])) or 'none'}"
            + (f" ({len(node['lora_problems'])} files unusable)" if node["lora_problems"] else ""),
            "Profiles: " + (", ".join(f"{md(m)} → {md(p)}" for m, p in node["profiles"].items()) or "none yet"),
            # The same count as the queue's "Failed (1 h)": jobs that failed in the last hour, by the node
            # they last ran on. The worker's own counters count attempts since it started (a retried attempt
            # included), which is a different thing.
            f"Failed (1 h): {node['failed_1h']:,} jobs",
            (f"Since it started: {node['jobs_done']:,} jobs done, {node['jobs_failed']:,} attempts failed; "
             f"{node['images']:,} images"),
            f"RAM: planned against {number(node['ram_planned_gib'])} GiB"
            if node["ram_planned_gib"] is not None else "RAM: not planned against",
        ]
        if node["ram_total_gib"] is not None:
            lines[-1] += (f" (machine: {number(node['ram_total_gib'])} GiB, "
                          f"{number(node['ram_available_gib'])} free at start)")
        if node["source"] == "totals":
            lines.append("Throughput: average over its render time (no recent samples)")
        if node["draining"] and node["drain_reason"]:
            lines.append(f"Draining: {md(node['drain_reason'])}")
        st.caption("  \n".join(lines))


def nodes_section(view: dict[str, Any]) -> None:
    st.header("Nodes")
    nodes = view["nodes"]
    if not nodes:
        st.info("No nodes registered: the queue waits until a farm starts its workers.")
        return
    rows = queries.throughput_history(view["samples"])
    colors = queries.node_colors([n["name"] for n in nodes] + [r["node"] for r in rows])
    columns = st.columns(min(3, len(nodes)))
    for i, node in enumerate(nodes):
        with columns[i % len(columns)]:
            node_card(node, colors[node["name"]])
    # Two charts for the whole farm, one line per node: a chart costs ~0.1 s to build whatever its data, and
    # one per node would make the page slower than its own refresh on a farm of a dozen nodes.
    if len({r["t"] for r in rows}) >= 2:
        frame = pd.DataFrame({"t": times(rows), "node": [r["node"] for r in rows],
                              "images/min": [r["images_per_min"] for r in rows],
                              "MP/s": [r["mp_per_s"] for r in rows]})
        shown = {name: colors[name] for name in sorted(set(frame["node"]))}
        left, right = st.columns(2)
        for column, metric in ((left, "images/min"), (right, "MP/s")):
            with column:
                st.caption(f"Throughput over time: {metric} per node (each point over the minute before it)")
                st.altair_chart(time_chart(frame, metric, "node", metric, shown), width="stretch")


def eta_text(row: dict[str, Any]) -> str:
    if row["state"] == "waiting":
        return f"after: {row['waiting']}"
    if row["state"] != "queued":
        return ""
    if row["waiting"]:
        return f"waiting: {row['waiting']}"
    return "" if row["eta_s"] is None else f"in {duration(row['eta_s'])}"


def jobs_section(view: dict[str, Any], filters: dict[str, str | None]) -> None:
    st.header("Jobs")
    listing = view["jobs"]
    facets = listing["facets"]

    def choices(key: str, values: list[str]) -> list[str]:
        current = filters.get(key)
        return [ALL, *values, *([current] if current and current not in values else [])]

    columns = st.columns(4)
    columns[0].selectbox("State", [ALL, *(s.value for s in JobState)], key="filter_state")
    columns[1].selectbox("Team", choices("team", facets["team"]), key="filter_team")
    columns[2].selectbox("Model", choices("model", facets["model"]), key="filter_model")
    columns[3].selectbox("Node", choices("node", sorted({*facets["node"], *(n["name"] for n in view["nodes"])})),
                         key="filter_node")
    rows = listing["rows"]
    now = view["now"]
    shown = f"latest {queries.JOB_LIMIT} per state (the queue and the waiting jobs from their heads)"
    skipped = f"; {listing['skipped']} unreadable records skipped" if listing["skipped"] else ""
    st.caption(f"{len(rows):,} jobs shown: {shown}{skipped}.")
    if rows:
        table = pd.DataFrame([{
            "id": r["id"], "state": r["state"], "team": r["team"], "model": r["model"], "node": r["node"],
            "position": r["position"], "ETA": eta_text(r), "size": r["size"], "steps": r["steps"],
            "images": r["images"], "priority": r["priority"], "attempts": r["attempts"],
            "age": duration(now - r["created_at"]),
            "finished": "" if r["finished_at"] is None else duration(now - r["finished_at"]) + " ago",
            "error": r["error"], "prompt": r["prompt"],
        } for r in rows])
        table["position"] = table["position"].astype("Int64")
        st.dataframe(table, hide_index=True, width="stretch")
    else:
        st.caption("No jobs match.")

    st.subheader("Failures")
    failed = view["failures"]
    if not failed:
        st.caption("No failed jobs.")
        return
    st.dataframe(pd.DataFrame([{
        "id": f["id"], "team": f["team"], "model": f["model"], "node": f["node"], "attempts": f["attempts"],
        "when": "" if f["finished_at"] is None else duration(now - f["finished_at"]) + " ago", "reason": f["error"],
    } for f in failed]), hide_index=True, width="stretch")


def ago(now: float, then: float | None) -> str:
    return "" if then is None else duration(now - then) + " ago"


def chains_section(view: dict[str, Any]) -> None:
    """The jobs that wait for others (the head of the waiting index), the jobs a parent ended, and one job's
    chain: its parents and its children with their states."""
    st.header("Chains")
    now, listing = view["now"], view["waiting"]
    rows = listing["rows"]
    skipped = f"; {listing['skipped']} unreadable records skipped" if listing["skipped"] else ""
    if rows:
        st.caption(f"{listing['total']:,} jobs wait for others; the first {len(rows):,} as they would be queued "
                   f"(higher priority first, then the oldest){skipped}.")
        st.dataframe(pd.DataFrame([{
            "id": r["id"], "waits for": r["waits_text"], "chain": r["kind"], "batch": r["batch"], "model": r["model"],
            "size": r["size"], "team": r["team"], "age": duration(r["age_s"]),
        } for r in rows]), hide_index=True, width="stretch")
    else:
        st.caption(f"No job waits for another{skipped}.")
    ended = view["blocked"]
    st.subheader("Ended by a parent")
    if ended:
        st.dataframe(pd.DataFrame([{
            "id": b["id"], "state": b["state"], "parent": b["blocked_by"], "batch": b["batch"], "team": b["team"],
            "model": b["model"], "when": ago(now, b["finished_at"]), "reason": b["reason"],
        } for b in ended]), hide_index=True, width="stretch")
    else:
        st.caption(f"No job among the latest {chains.BLOCKED_SCAN} failed or cancelled was ended by a parent.")
    st.subheader("A job's chain")
    st.text_input("Job id", key="chain_job", placeholder="a job id: its parents and children")
    asked, detail = view["chain_job"], view["chain"]
    if not asked:
        return
    if detail is None:
        st.caption(f"No job {md(asked)} (or its record does not read).")
        return
    job = detail["job"]
    facts = [f"**{md(job['id'])}** {md(job['state'])}", f"batch {md(job['batch'] or '?')}", md(job["model"]),
             md(job["size"]), f"team {md(job['team'])}", f"submitted {duration(job['age_s'])} ago"]
    if job["kind"] not in ("", "after"):  # a hires pass, an img2img from an earlier job
        facts.append(md(job["kind"]))
    st.markdown(" · ".join(facts))
    if job["blocked_by"]:
        st.caption(f"Ended by job {md(job['blocked_by'])}: {md(job['error'])}")
    elif job["error"]:
        st.caption(f"Error: {md(job['error'])}")
    left, right = st.columns(2)
    with left:
        st.caption(f"Runs after ({len(detail['parents'])}): {len(detail['waits_on'])} not done"
                   if detail["parents"] else "Runs after no job.")
        if detail["parents"]:
            st.dataframe(pd.DataFrame([{"parent": p["id"], "state": p["state"], "finished": ago(now, p["finished_at"])}
                                       for p in detail["parents"]]), hide_index=True, width="stretch")
    with right:
        kids, total = detail["children"], detail["children_total"]
        more = f", the first {len(kids)} shown" if total > len(kids) else ""
        st.caption(f"Jobs that waited for it ({total:,}{more})" if total else "No job waited for it.")
        if kids:
            st.dataframe(pd.DataFrame([{"child": k["id"], "state": k["state"], "ended by it": k["ended_by_it"]}
                                       for k in kids]), hide_index=True, width="stretch")


def gallery_section(settings: dict[str, Any], view: dict[str, Any]) -> None:
    st.header("Gallery")
    entries = [e for job_id in view["gallery"] if (e := gallery_entry(settings["url"], settings["prefix"], job_id))]
    if not entries:
        st.caption("No finished images yet.")
        return
    columns = st.columns(4)
    for i, entry in enumerate(entries):
        s = entry["settings"]
        with columns[i % 4]:
            if entry["image"]:
                st.image(entry["image"], width="stretch")
            else:
                st.caption("(image expired)")
            st.markdown(f"**{md(s.get('prompt', ''), limit=81)}**")
            details = " · ".join(f"{k} {md(s[k])}" for k in ("Model", "Size", "Steps", "CFG scale", "Seed", "Sampler")
                                 if s.get(k))
            profile = f" ({md(entry['profile'])})" if entry["profile"] else ""
            st.caption(f"{details}  \njob {md(entry['id'])} on {md(entry['node'] or '?')}{profile}")
            if entry["settings"].get("text"):
                with st.expander("Generation settings"):
                    st.code(entry["settings"]["text"], language=None, wrap_lines=True)


# --- the page --------------------------------------------------------------------------------------------


def read_view(store: Store, settings: dict[str, Any], filters: dict[str, str | None]) -> dict[str, Any]:
    """Everything the live part shows, read before anything is drawn: a failing read shows one error, not
    half a page."""
    now = time.time()
    samples = store.samples(queries.SAMPLE_COUNT)
    chain_job = str(st.session_state.get("chain_job") or "").strip()
    return {
        "now": now,
        "overview": queries.overview(store, now),
        "samples": samples,
        "nodes": queries.nodes(store, samples, settings["dead_after"], now),
        "jobs": queries.jobs(store, **filters, now=now),
        "failures": queries.failures(store),
        "waiting": chains.waiting(store, now=now),
        "blocked": chains.blocked(store),
        "chain_job": chain_job,
        "chain": chains.chain(store, chain_job, now=now) if chain_job else None,
        "gallery": queries.latest_done(store),  # ids: entries are read (and cached) while drawing
    }


def selected(key: str) -> str | None:
    value = st.session_state.get(key)
    return None if value in (None, ALL) else value


def no_work_banner(view: dict[str, Any]) -> str | None:
    """Why no job can start, when no node takes work (every node draining, dead or stopped, or none left);
    None while one does."""
    nodes = view["nodes"]
    if any(n["state"] in TAKES_WORK for n in nodes):
        return None
    queued, held = view["overview"]["queued"], view["overview"]["waiting"]
    jobs = f"{queued:,} queued jobs wait" if queued else "new jobs will wait"
    if held:
        jobs += f" ({held:,} more wait for other jobs)"
    if not nodes:
        return f"No node takes work: none is registered; {jobs}."
    states = ", ".join(f"{md(n['name'])} {n['state']}" for n in nodes)
    return f"No node takes work ({states}): {jobs}."


@st.fragment(run_every=REFRESH_S)
def live(settings: dict[str, Any]) -> None:
    url = redact(settings["url"])
    filters = {k: selected(f"filter_{k}") for k in ("state", "team", "model", "node")}
    try:
        Keys(settings["prefix"])
    except ValueError as exc:
        st.error(f"Invalid key prefix: {exc}")
        return
    try:
        store = open_store(settings["url"], settings["prefix"])
        view = read_view(store, settings, filters)
    except UNREACHABLE as exc:
        reason = exc.reason if isinstance(exc, RedisUnavailable) else f"{type(exc).__name__}: {exc}"
        st.error(f"Redis unreachable at {url} ({reason}). Retrying every {REFRESH_S} s.", icon="🚨")
        return
    except ValueError as exc:  # a malformed URL (connect names it redacted)
        st.error(f"Redis unreachable: {exc}", icon="🚨")
        return
    except redis.RedisError as exc:
        st.error(f"Redis at {url} answered with an error: {exc}. Retrying every {REFRESH_S} s.", icon="🚨")
        return
    if view["overview"]["total"] == 0 and not view["nodes"]:
        st.info(
            f"No farm yet: no nodes and no jobs under prefix {settings['prefix']!r} at {url}. "
            "Start one with `renderfarm up`, then submit with `renderfarm submit`."
        )
        return
    banner = no_work_banner(view)
    if banner:
        st.warning(banner, icon="⚠️")
    queue_section(view)
    nodes_section(view)
    jobs_section(view, filters)
    chains_section(view)
    try:
        gallery_section(settings, view)
    except redis.RedisError as exc:  # Redis went away between the reads: the next run says so
        st.caption(f"Gallery unavailable: {exc}")
    st.caption(f"Redis {url} · prefix {settings['prefix']} · updated {time.strftime('%H:%M:%S')}")


def show(result: dict[str, Any]) -> None:
    (st.success if result["ok"] else st.error)(result["message"])


def actions(settings: dict[str, Any]) -> None:
    st.subheader("Actions")
    try:
        store = open_store(settings["url"], settings["prefix"])
        names = [n["name"] for n in store.nodes()]
    except (*UNREACHABLE, ValueError, redis.RedisError):
        st.caption("Actions wait for Redis.")
        return
    job_id = st.text_input("Job id", key="action_job", placeholder="a job id from the table")
    left, right = st.columns(2)
    cancel = left.button("Cancel job", key="action_cancel")
    retry = right.button("Retry failed job", key="action_retry")
    node = st.selectbox("Node", names, key="action_node", index=None, placeholder="choose a node")
    left, right = st.columns(2)
    drain = left.button("Drain node", key="action_drain")
    undrain = right.button("Undrain node", key="action_undrain")
    try:
        if cancel:
            show(queries.cancel_job(store, job_id))
        elif retry:
            show(queries.retry_job(store, job_id))
        elif drain or undrain:
            choose = {"ok": False, "message": "Choose a node."}
            show(queries.drain_node(store, node, draining=drain) if node else choose)
    except (*UNREACHABLE, redis.RedisError) as exc:
        st.error(f"Not done: Redis unreachable ({type(exc).__name__}).")


def team_tokens(settings: dict[str, Any], entered: str | None = None) -> tuple[bool, bool]:
    """(the farm is in token mode, `entered` is one of its admin tokens); (False, False) while Redis is away."""
    try:
        store = open_store(settings["url"], settings["prefix"])
        if not auth.token_mode(store.redis, store.keys):
            return False, False
        return True, auth.is_admin_token(store.redis, store.keys, entered)
    except (*UNREACHABLE, ValueError, redis.RedisError):
        return False, False


def sidebar(settings: dict[str, Any]) -> None:
    with st.sidebar:
        st.caption(f"Redis {redact(settings['url'])} · prefix {settings['prefix']}")
        token = settings["token"]
        if settings["short_token"]:
            st.warning(f"RENDERFARM_DASHBOARD_TOKEN is shorter than {MIN_TOKEN} characters: ignored.")
        token_mode, _ = team_tokens(settings)
        if not token and not token_mode:
            st.caption("read-only: set RENDERFARM_DASHBOARD_TOKEN (or create an admin team token) to enable "
                       "cancel, retry and drain.")
            return
        entered = st.text_input("Dashboard token" if token else "Admin token", type="password", key="token")
        if not entered:
            st.caption(f"read-only until the {'dashboard' if token else 'admin'} token is entered.")
        elif token and hmac.compare_digest(entered.encode(), token.encode()):
            actions(settings)
        elif team_tokens(settings, entered)[1]:  # an admin team token (checked on every run: revocation bites)
            actions(settings)
        else:
            st.warning("Wrong token: read-only.")


def main() -> None:
    st.set_page_config(page_title="renderfarm", layout="wide")
    st.title("renderfarm")
    settings = page_settings()
    sidebar(settings)
    live(settings)


main()
