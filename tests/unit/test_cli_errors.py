"""The CLI's error contract: a RenderfarmError is one line (or one JSON object) and exit code 1; anything
else is a bug and keeps its traceback."""

import pytest

from renderfarm import cli
from renderfarm.errors import ConfigError, RenderfarmError


def _fail_with(monkeypatch, exc: BaseException):
    def command(args):
        raise exc

    monkeypatch.setattr(cli.plan, "cmd_plan", command)


def test_a_user_facing_error_is_one_line(monkeypatch, capsys):
    _fail_with(monkeypatch, ConfigError("nodes.yaml: nodes[0].vram_gib: must be positive"))
    assert cli.main(["plan", "--model", "sdxl", "--vram", "8"]) == 1
    err = capsys.readouterr().err
    assert err == "renderfarm plan: error: nodes.yaml: nodes[0].vram_gib: must be positive\n"


def test_with_json_it_is_one_json_object(monkeypatch, capsys):
    _fail_with(monkeypatch, RenderfarmError("no farm found"))
    assert cli.main(["plan", "--model", "sdxl", "--vram", "8", "--json"]) == 1
    assert capsys.readouterr().out == '{"ok":false,"error":"no farm found"}\n'


@pytest.mark.parametrize("bug", [ValueError("a bug"), OSError("a bug"), KeyError("a bug")])
def test_a_bug_keeps_its_traceback(monkeypatch, bug):
    """Before the cli package, any ValueError or OSError became a one-line message and hid the bug."""
    _fail_with(monkeypatch, bug)
    with pytest.raises(type(bug)):
        cli.main(["plan", "--model", "sdxl", "--vram", "8"])


def test_debug_shows_the_traceback_of_a_user_facing_error_too(monkeypatch):
    _fail_with(monkeypatch, ConfigError("bad"))
    with pytest.raises(ConfigError):
        cli.main(["plan", "--model", "sdxl", "--vram", "8", "--debug"])


def test_every_command_group_registers_its_own_subcommands():
    parser = cli.build_parser()
    commands = set(parser._subparsers._group_actions[0].choices)  # noqa: SLF001 (argparse has no public way)
    assert commands == {"up", "worker", "demo", "dashboard", "submit", "status", "jobs", "cancel", "retry", "drain",
                        "plan", "bench", "token", "loras", "api", "webhooks"}


def test_version_is_the_installed_packages(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"renderfarm {version('renderfarm')}\n"


def test_the_simulator_trace_ships_inside_the_package():
    """An installed wheel has no bench/: `renderfarm bench sim` reads package data."""
    from pathlib import Path

    import renderfarm
    from renderfarm.scheduler.simulate import DEFAULT_CLUSTER, DEFAULT_TRACE, load_cluster, load_trace

    package = Path(renderfarm.__file__).resolve().parent
    for path in (DEFAULT_TRACE, DEFAULT_CLUSTER):
        assert path.is_relative_to(package) and path.exists()
    assert len(load_trace()) >= 100 and load_cluster()
