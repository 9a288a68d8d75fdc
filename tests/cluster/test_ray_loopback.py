"""What Ray 2.60 does with a loopback address, pinned: the farm cannot keep a private Ray on 127.0.0.1.

`ray start --node-ip-address 127.0.0.1` is turned into the machine's reachable address by Ray itself
(`services.resolve_ip_for_localhost`), so a private farm's Ray listens where the machine does. The farm
relies on token authentication for it instead (cluster/ray_auth.py: every private cluster gets a fresh
random token). If an upgrade lets Ray bind loopback, this test fails: then pass 127.0.0.1 for private farms.
"""

import socket

import pytest
from ray._private import services


def _has_an_address_off_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # TEST-NET: no packet is sent
            return not s.getsockname()[0].startswith("127.")
    except OSError:
        return False


@pytest.mark.skipif(not _has_an_address_off_loopback(), reason="this machine has no address off loopback")
def test_ray_turns_a_loopback_node_address_into_the_machines_own():
    assert services.resolve_ip_for_localhost("127.0.0.1") == services.get_node_ip_address()
    assert not services.resolve_ip_for_localhost("127.0.0.1").startswith("127.")
