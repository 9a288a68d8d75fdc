"""What every command shares: its parent parsers, output (`--json` or text), settings, finding the farm's
Redis, reading numbers and files from flags, following jobs with a progress bar."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from renderfarm.config import Settings
from renderfarm.errors import CliError, SpecFileError, shown

# Exit codes (README, "Submit and follow"): 0 all went as asked; 1 an error, or jobs that failed or could not
# be found, cancelled or retried; 2 a command line argparse cannot read; 3 `submit --timeout` expired with jobs
# still pending; 130 interrupted (Ctrl-C) while waiting.
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 3
EXIT_INTERRUPTED = 130
FARM_FILE = "farm.json"  # written by `up` in its data dir so other commands find its Redis

log = logging.getLogger("renderfarm")


def parent_parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """(flags every command takes, flags of commands that talk to a farm's Redis)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    common.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    common.add_argument("--config", help="settings YAML (fields of renderfarm.config.Settings)")
    common.add_argument("--data-dir", type=Path, help="where the farm keeps its Redis data and farm.json")

    with_redis = argparse.ArgumentParser(add_help=False)
    with_redis.add_argument("--redis", metavar="URL", help="redis:// or rediss:// URL of the farm's Redis")
    with_redis.add_argument("--token", metavar="TOKEN", help="team token, for a farm in token mode (prefer the "
                            "RENDERFARM_TOKEN environment variable: a command line is visible to other users)")
    return common, with_redis


def stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def emit(args: argparse.Namespace, payload: dict[str, Any], human: str | None = None) -> None:
    if args.json:
        sys.stdout.write(json.dumps(payload, default=str, separators=(",", ":")) + "\n")
        sys.stdout.flush()
    elif human is not None:
        print(human)


def settings_from(args: argparse.Namespace) -> Settings:
    return Settings.load(
        getattr(args, "config", None),
        redis_url=getattr(args, "redis", None),
        data_dir=getattr(args, "data_dir", None),
        nodes_file=getattr(args, "nodes", None),
    )


def resolve_url(args: argparse.Namespace) -> str:
    """--redis, then RENDERFARM_REDIS_URL / the config file, then the URL a running `up` recorded."""
    settings = settings_from(args)
    if settings.redis_url:
        return settings.redis_url
    farm_file = settings.data_dir / FARM_FILE
    if farm_file.exists():
        try:
            return json.loads(farm_file.read_text())["redis_url"]
        except (ValueError, KeyError) as exc:
            raise CliError(f"{farm_file} is not a farm record ({exc}); pass --redis URL") from None
    raise CliError(
        "no farm found: start one with `renderfarm up`, or pass --redis URL "
        f"(or set RENDERFARM_REDIS_URL); looked for {farm_file}"
    )


def client_from(args: argparse.Namespace, *, empty_ok: bool = True):
    """A client for the farm the flags name, checked to be a farm (FarmClient.check_farm): a URL whose
    database number is wrong is refused, naming the database that holds the farm. `empty_ok=False` for
    commands whose answer from an empty database would mislead (an empty overview, a list of no jobs)."""
    from renderfarm.client import FarmClient

    client = FarmClient(resolve_url(args), token=team_token(args))
    client.check_farm(empty_ok=empty_ok)
    return client


def team_token(args: argparse.Namespace) -> str | None:
    """--token, else RENDERFARM_TOKEN: the team token a farm in token mode asks for (cluster/auth.py)."""
    return getattr(args, "token", None) or os.environ.get("RENDERFARM_TOKEN") or None


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = text.lower().split("x")
        return int(w), int(h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size {text!r}: expected WIDTHxHEIGHT, e.g. 1024x1024") from None


def _save_images(client, job, out: Path) -> list[str]:
    paths = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        for i, data in enumerate(client.result(job.id).png):
            path = out / f"{job.id}_{i}.png"
            path.write_bytes(data)
            paths.append(str(path))
    except OSError as exc:  # the jobs are done and their images stay in the farm: say where it failed
        raise CliError(f"--out {out}: cannot save {job.id}'s images ({exc.strerror or exc}); they stay "
                       "in the farm until their result expires") from None
    return paths


def follow(client, ids: list[str], out: Path | None, timeout: float | None, quiet: bool) -> dict[str, Any]:
    """Wait for `ids` with a progress bar on stderr, saving images as they arrive. Returns the jobs `done`
    and `failed`, the `images` saved, the ids still `pending`, and `stopped`: None when every job finished,
    else "timeout" (--timeout expired) or "interrupted" (Ctrl-C); the pending jobs stay in the farm."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from renderfarm.errors import WaitTimeout

    done, failed, images, stopped = [], [], [], None
    progress = Progress(
        TextColumn("[bold]rendering"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=stderr_console(), disable=quiet, transient=False,
    )
    try:
        with progress:
            task = progress.add_task("jobs", total=len(ids))
            for job in client.as_completed(ids, timeout=timeout):
                if job.state.value == "done":
                    done.append(job)
                    if out is not None:
                        images += _save_images(client, job, out)
                else:
                    failed.append(job)
                progress.advance(task)
    except WaitTimeout:
        stopped = "timeout"
    except KeyboardInterrupt:
        stopped = "interrupted"
    finished = {job.id for job in done + failed}
    pending = [job_id for job_id in ids if job_id not in finished]
    return {"done": done, "failed": failed, "images": images, "pending": pending, "stopped": stopped}


def stop_on_signals() -> threading.Event:
    """An event that Ctrl-C (SIGINT) or SIGTERM sets: a foreground command waits on it, then shuts down."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def given(value: Any, default: Any) -> Any:
    return default if value is None else value


def flag_int(flag: str, text: str | None) -> int | None:
    """A submit flag's whole number, parsed here rather than by argparse so that a bad value is one `error:`
    line (a JSON object with --json) like every other submit error. Ranges are JobSpec's to check."""
    if text is None:
        return None
    number = text.strip()
    digits = number[1:] if number[:1] in ("+", "-") else number
    if not (digits.isascii() and digits.isdigit()):
        raise CliError(f"{flag} {shown(text)}: expected a whole number")
    if len(digits) > 30:
        raise CliError(f"{flag} {shown(text)}: the number is far out of range")
    return int(number)


def flag_float(flag: str, text: str | None) -> float | None:
    import math

    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise CliError(f"{flag} {shown(text)}: expected a number") from None
    if not math.isfinite(value):
        raise CliError(f"{flag} {shown(text)}: expected a finite number")
    return value



def read_flag_file(flag: str, path: str) -> str:
    """The text of a file named by a flag; an unreadable one is one error line that names the flag."""
    from renderfarm.specfile import read_text

    try:
        return read_text(path)
    except SpecFileError as exc:
        raise CliError(f"{flag} {exc}") from None
