"""The RAY_AUTH_* variables of our drivers and daemons (no cluster needed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from renderfarm.cluster.ray_auth import (
    AUTH_ENV,
    DriverAuth,
    daemon_env,
    driver_env,
    join_env,
)


def test_a_driver_with_a_token_uses_it_and_puts_the_environment_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", "/elsewhere/token")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    before = {name: os.environ.get(name) for name in AUTH_ENV}
    auth = DriverAuth("s3cret")
    auth.apply()
    try:
        assert {name: os.environ.get(name) for name in AUTH_ENV} == {
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "s3cret", "RAY_AUTH_TOKEN_PATH": None,
        }  # fmt: skip
    finally:
        auth.restore()
    assert {name: os.environ.get(name) for name in AUTH_ENV} == before
    auth.restore()  # a second restore changes nothing
    assert {name: os.environ.get(name) for name in AUTH_ENV} == before


def test_an_explicit_auth_mode_is_kept_without_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert driver_env(None) == {}


def test_daemons_read_the_token_from_its_file(tmp_path: Path) -> None:
    assert daemon_env(tmp_path / "auth_token") == {
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "auth_token"),
    }  # fmt: skip


def test_join_env_without_a_token_passes_on_what_the_driver_uses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", "/run/ray/token")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    assert join_env("10.0.0.5:6379", None) == {
        "RAY_ADDRESS": "10.0.0.5:6379", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": "/run/ray/token",
    }  # fmt: skip
    monkeypatch.delenv("RAY_AUTH_MODE")
    assert join_env("10.0.0.5:6379", None)["RAY_AUTH_MODE"] == "disabled"
