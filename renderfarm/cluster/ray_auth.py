"""Ray's token authentication, set explicitly for every process of a farm's Ray cluster.

Ray 2.60 decides per process whether to use token auth (read in its source; tests/cluster pin it): `ray start --head`
turns it on when `RAY_AUTH_MODE` is unset *and* a token exists (~/.ray/auth_token, `RAY_AUTH_TOKEN`,
`RAY_AUTH_TOKEN_PATH`); a plain local `ray.init()` turns it on and writes ~/.ray/auth_token; but a driver or
`ray start --address` with an explicit address never turns it on by itself. So whether a second process can
talk to the head depends on files in the home directory: InvalidAuthToken, or a driver that hangs ~20 s.

We therefore never leave `RAY_AUTH_MODE` unset. A private cluster uses token mode, with a fresh random
token unless it is given one (rather than `RAY_AUTH_MODE=disabled`): the GCS listens on every interface
(Ray rewrites 127.0.0.1 to the node's IP), so "disabled" would let anyone on the network run code on the
farm. The token lives in `<temp_dir>/auth_token` (mode 0600); every `ray start` we launch (the head, an
added node, this machine joining as a node) runs with `daemon_env()`: `RAY_AUTH_MODE=token` +
`RAY_AUTH_TOKEN_PATH`. Our driver runs with `driver_env()` (given the token: `RAY_AUTH_MODE=token` +
`RAY_AUTH_TOKEN`), set in this process's environment by `DriverAuth.apply()` and put back by
`DriverAuth.restore()`. A private cluster neither reads nor writes ~/.ray. Another process joins with
`join_env()` exported, or with `RayCluster.join(address, auth_token=...)`.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def new_token() -> str:
    """A fresh random token for a private cluster."""
    return secrets.token_hex(32)


def daemon_env(token_path: Path) -> dict[str, str]:
    """The RAY_AUTH_* variables of a `ray start` process (and so of every daemon it starts)."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}


def driver_env(auth_token: str | None) -> dict[str, str | None]:
    """The RAY_AUTH_* variables our driver runs with (None = unset; a variable not named is left alone).

    With a token: token mode with it. Without one: an explicit `RAY_AUTH_MODE` in the environment is kept;
    otherwise token mode when Ray can find a token, exactly the rule `ray start --head` applies, else
    "disabled"."""
    if auth_token is not None:
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": auth_token, "RAY_AUTH_TOKEN_PATH": None}
    if os.environ.get("RAY_AUTH_MODE"):
        return {}
    from ray._raylet import AuthenticationTokenLoader

    loader = AuthenticationTokenLoader.instance()
    loader.reset_cache()
    has_token = loader.has_token(ignore_auth_mode=True)
    return {"RAY_AUTH_MODE": "token" if has_token else "disabled"}


def join_env(address: str, auth_token: str | None) -> dict[str, str]:
    """Environment another process needs to join the cluster at `address`: a driver (`ray.init()` or
    `RayCluster.join`) or a node (`ray start --address`). Without `auth_token`, what this process's driver
    runs with is passed on. It carries the token: hand it only to processes you trust."""
    env = {"RAY_ADDRESS": address}
    if auth_token is not None:
        env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": auth_token})
    else:
        env["RAY_AUTH_MODE"] = os.environ.get("RAY_AUTH_MODE") or "disabled"
        for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
            if os.environ.get(name):
                env[name] = os.environ[name]
    return env


class DriverAuth:
    """This process's RAY_AUTH_* variables while it is a driver: `apply()` sets `driver_env(auth_token)`,
    `restore()` puts back what was there before (each at most once)."""

    def __init__(self, auth_token: str | None) -> None:
        self.auth_token = auth_token
        self._saved: dict[str, str | None] | None = None

    def apply(self) -> None:
        self._saved = {name: os.environ.get(name) for name in AUTH_ENV}
        _set_env(driver_env(self.auth_token))

    def restore(self) -> None:
        if self._saved is None:
            return
        saved, self._saved = self._saved, None
        _set_env(saved)


def _set_env(values: dict[str, str | None]) -> None:
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    _reload_ray_auth()


def _reload_ray_auth() -> None:
    """Make Ray's C++ side re-read RAY_AUTH_* (it caches the mode and the token)."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
