"""The `ray start` side of a private cluster that needs no running cluster: its temp dir and its options."""

from __future__ import annotations

from pathlib import Path

import pytest

from renderfarm.cluster.ray_processes import (
    claim_temp_dir,
    node_args,
    token_path,
    write_token,
)


def test_claiming_a_temp_dir_drops_a_previous_run_s_address(short_tmp: Path) -> None:
    (short_tmp / "ray_current_cluster").write_text("127.0.0.1:1")
    assert claim_temp_dir(short_tmp) == short_tmp
    assert not (short_tmp / "ray_current_cluster").exists()


def test_a_temp_dir_too_long_for_ray_s_sockets_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unix sockets"):
        claim_temp_dir(tmp_path / ("x" * 60))


def test_the_token_file_is_private(short_tmp: Path) -> None:
    path = write_token(short_tmp, "t0ken")
    assert path == token_path(short_tmp)
    assert path.read_text() == "t0ken" and (path.stat().st_mode & 0o777) == 0o600


def test_node_args_pick_explicit_ports_and_pass_what_is_given() -> None:
    args = node_args(2, None, {"vram_gb": 8}, {"rf/card": "x"}, None, "10.0.0.7")
    assert "--node-manager-port" in args and "--num-gpus" not in args
    assert args[args.index("--resources") + 1] == '{"vram_gb": 8}'
    assert args[args.index("--labels") + 1] == "rf/card=x"
    assert args[args.index("--node-ip-address") + 1] == "10.0.0.7"
