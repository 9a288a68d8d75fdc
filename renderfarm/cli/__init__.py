"""The `renderfarm` command. Every command takes --json (one JSON object on one line on stdout; logs and
progress go to stderr) and --debug (tracebacks and debug logs).

One module per command group, each registering its own subcommands beside its code: `farm` (up, worker,
demo, dashboard), `jobs` (submit, status, jobs, cancel, retry, drain), `tokens`, `plan`, `loras`, `bench`, `api`
(the HTTP API), `webhooks` (secrets, deliveries). A
user-facing error (`RenderfarmError`, renderfarm/errors.py) is one `renderfarm CMD: error: ...` line and exit
code 1; any other exception is a bug and keeps its traceback. Exit codes: cli/common.py (EXIT_*).

A reader that stops reading early (`renderfarm status | head -1`) ends the command quietly.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from renderfarm.cli import api, bench, farm, jobs, loras, plan, tokens, webhooks
from renderfarm.cli.common import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    emit,
    parent_parsers,
)
from renderfarm.errors import RenderfarmError, UsageError

__all__ = ["build_parser", "main"]

COMMAND_GROUPS = (farm, jobs, plan, loras, bench, tokens, api, webhooks)


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors come back to `main` (which prints one line, or JSON with --json)
    instead of exiting from inside argparse."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{self.prog}: error: {message}")


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("renderfarm")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    common, with_redis = parent_parsers()
    parser = _Parser(prog="renderfarm", description="A render farm for diffusion models.")
    parser.add_argument("--version", action="version", version=f"renderfarm {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in COMMAND_GROUPS:
        group.register(sub, common, with_redis)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        given = sys.argv[1:] if argv is None else argv
        if "--json" in given:
            print(json.dumps({"ok": False, "error": str(exc)}))
        else:
            print(parser.format_usage().rstrip() + "\n" + str(exc), file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s" if args.debug else "%(message)s",
        stream=sys.stderr,
    )
    if args.json and not args.debug:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        code = args.func(args)
        sys.stdout.flush()  # here, so that a reader gone away is caught below and not at interpreter exit
        return code
    except BrokenPipeError:
        # The reader closed the pipe (`| head -1`): the usual Python recipe, so that the interpreter's own
        # flush at exit writes to nowhere instead of printing a second error.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except RenderfarmError as exc:
        if args.debug:
            raise
        if args.json:
            emit(args, {"ok": False, "error": str(exc)})
        else:
            print(f"renderfarm {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
