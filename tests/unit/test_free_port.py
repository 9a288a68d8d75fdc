"""free_port never hands out a port it handed out recently: the kernel may offer a just-closed port again,
and `ray start` refused to start when two of its components got the same one (seen in CI)."""

import socket

from renderfarm.cluster import processes


class _Kernel:
    """Offers ports in a fixed order, repeating the first as a kernel may right after it was closed."""

    offers = [40001, 40001, 40001, 40002]

    def __init__(self, *args):
        self.port = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def bind(self, address):
        self.port = _Kernel.offers.pop(0)

    def getsockname(self):
        return ("127.0.0.1", self.port)


def test_a_port_offered_twice_is_handed_out_once(monkeypatch):
    monkeypatch.setattr(processes, "_RECENT_PORTS", type(processes._RECENT_PORTS)(maxlen=512))
    monkeypatch.setattr(processes.socket, "socket", _Kernel)
    assert processes.free_port() == 40001
    assert processes.free_port() == 40002


def test_real_ports_are_distinct():
    ports = [processes.free_port("") for _ in range(50)]
    assert len(set(ports)) == 50 and all(isinstance(p, int) and p > 0 for p in ports)
    assert socket.socket is not _Kernel
