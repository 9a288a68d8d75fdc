"""connect() refuses a Redis off loopback that lets in clients without a password; rediss:// (TLS) works end to
end. The classification is tested as pure logic; the refusals and TLS against real redis-servers, each stopped
at the end of its test."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import pytest
import redis
from redis.connection import parse_url

from renderfarm.cluster.redis_server import (
    EmbeddedRedis,
    InsecureRedis,
    RedisUnavailable,
    _has_credentials,
    connect,
    find_redis_server,
    free_port,
    is_local_url,
    is_loopback_host,
)

PASSWORD = "tls-s3cret-pw"


# --- loopback classification: pure logic -------------------------------------------------------------------


def resolver(table: dict[str, list[str]]):
    def resolve(host, port):
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, 0)) for a in table[host]]

    return resolve


@pytest.mark.parametrize("host", [
    None, "", "localhost", "LOCALHOST", "localhost.", "127.0.0.1", "127.3.4.5", "127.255.255.254", "::1", "[::1]",
    "::ffff:127.0.0.1", "0:0:0:0:0:0:0:1",
])  # fmt: skip
def test_loopback_hosts(host):
    assert is_loopback_host(host, resolver({}))


@pytest.mark.parametrize("host", [
    "10.0.0.5", "192.0.2.2", "0.0.0.0", "128.0.0.1", "::", "::ffff:10.0.0.1", "fe80::1%eth0", "2001:db8::1",
    "redis.example.com",  # does not resolve: not loopback
])  # fmt: skip
def test_non_loopback_hosts(host):
    assert not is_loopback_host(host, resolver({}))


def test_names_are_loopback_only_when_every_address_is():
    resolve = resolver({
        "redis-local": ["127.0.1.1"], "both": ["127.0.0.1", "10.0.0.5"], "v6": ["::1", "127.0.0.1"],
        "nothing": [], "lan": ["192.168.1.20"],
    })  # fmt: skip
    assert is_loopback_host("redis-local", resolve)
    assert is_loopback_host("v6", resolve)
    assert not is_loopback_host("both", resolve)
    assert not is_loopback_host("nothing", resolve)
    assert not is_loopback_host("lan", resolve)


def test_local_urls():
    resolve = resolver({"redis.lan": ["10.1.2.3"]})
    assert is_local_url("unix:///run/redis/redis.sock", resolve)
    assert is_local_url("unix:///run/redis.sock?db=2&password=pw", resolve)
    assert is_local_url("redis://127.0.0.1:6379/0", resolve)
    assert is_local_url("redis://:pw@localhost/0", resolve)
    assert is_local_url("rediss://[::1]:6380/0", resolve)
    assert is_local_url("redis:///0", resolve)  # no host: redis-py connects to localhost
    assert not is_local_url("redis://10.0.0.5:6379/0", resolve)
    assert not is_local_url("rediss://farm:pw@redis.lan:6380/0", resolve)
    assert not is_local_url("redis://[2001:db8::1]:6379/0", resolve)


def test_what_counts_as_credentials():
    assert _has_credentials(parse_url("redis://:pw@10.0.0.5/0"))
    assert _has_credentials(parse_url("redis://farm:pw@10.0.0.5/0"))
    assert _has_credentials(parse_url("redis://10.0.0.5/0?password=pw"))
    assert _has_credentials(parse_url("rediss://10.0.0.5/0?ssl_certfile=/c.pem&ssl_keyfile=/k.pem"))  # mutual TLS
    assert not _has_credentials(parse_url("redis://10.0.0.5/0"))
    assert not _has_credentials(parse_url("redis://farm@10.0.0.5/0"))  # a user name alone is no secret


# --- real servers off loopback --------------------------------------------------------------------------------


def _non_loopback_address() -> str | None:
    """An IPv4 address of this machine that is not loopback and can be bound, or None."""
    candidates: list[str] = []
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
            candidates.append(probe.getsockname()[0])
    except OSError:
        pass
    if shutil.which("hostname"):
        try:
            out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=5).stdout
            candidates += out.split()
        except (OSError, subprocess.SubprocessError):
            pass
    for address in candidates:
        if ":" in address or is_loopback_host(address) or address == "0.0.0.0":
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((address, 0))
        except OSError:
            continue
        return address
    return None


NON_LOOPBACK = _non_loopback_address()
needs_address = pytest.mark.skipif(NON_LOOPBACK is None, reason="this machine has no non-loopback IPv4 address")


@pytest.mark.integration
@needs_address
def test_open_server_off_loopback_is_refused(tmp_path: Path):
    # protected-mode off: a truly open server (with it on, redis itself answers DENIED to outsiders)
    with EmbeddedRedis(tmp_path / "open", host=NON_LOOPBACK, extra_args=["--protected-mode", "no"]) as srv:
        assert srv.url == f"redis://{NON_LOOPBACK}:{srv.port}/0"
        with pytest.raises(InsecureRedis) as info:
            connect(srv.url)
        message = str(info.value)
        assert isinstance(info.value, RedisUnavailable)
        assert srv.url in message and "not on loopback" in message
        for fix in ("requirepass <secret>", "ACL SETUSER farm on >secret ~* +@all", "redis://farm:<secret>@",
                    "rediss://"):
            assert fix in message, fix
        connect(srv.url, allow_open=True).close()  # the escape hatch tests use

        # An ACL user with a password is no protection while the default user lets anyone in...
        admin = connect(srv.url, allow_open=True)
        try:
            admin.execute_command("ACL", "SETUSER", "farm", "on", ">acl-pw-123", "~*", "+@all")
            with_user = f"redis://farm:acl-pw-123@{NON_LOOPBACK}:{srv.port}/0"
            with pytest.raises(InsecureRedis) as info:
                connect(with_user)
            assert "answers clients that send no password" in str(info.value)
            assert "acl-pw-123" not in str(info.value) and "acl-pw-123" not in repr(info.value.args)
            assert f"redis://farm:***@{NON_LOOPBACK}:{srv.port}/0" in str(info.value)
            # ... and is, once the default user is off.
            admin.execute_command("ACL", "SETUSER", "default", "off")
            client = connect(with_user)
            assert client.ping()
            client.close()
        finally:
            admin.close()


@pytest.mark.integration
@needs_address
def test_password_protected_server_off_loopback(tmp_path: Path):
    password = "off-loopback-pw"
    with EmbeddedRedis(tmp_path / "auth", host=NON_LOOPBACK, password=password) as srv:
        client = connect(srv.url)
        assert client.ping()
        client.close()
        bare = f"redis://{NON_LOOPBACK}:{srv.port}/0"
        with pytest.raises(RedisUnavailable) as info:
            connect(bare)
        assert not isinstance(info.value, InsecureRedis)
        assert "wants a password" in str(info.value) and bare in str(info.value)


@pytest.mark.integration
def test_loopback_servers_need_no_password(tmp_path: Path):
    with EmbeddedRedis(tmp_path / "lo") as srv:
        for url in (srv.url, f"redis://localhost:{srv.port}/0"):
            client = connect(url)
            assert client.ping()
            client.close()


# --- TLS --------------------------------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args[:2])} failed: {proc.stderr[-1000:]}")


def make_certs(directory: Path, addresses: list[str]) -> dict[str, Path]:
    """A throwaway CA and a server certificate for `addresses` (and localhost), valid for one day."""
    directory.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
             "-subj", "/CN=renderfarm test CA", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=localhost", cwd=directory)
    san = ",".join(["DNS:localhost", *(f"IP:{a}" for a in addresses)])
    (directory / "server.ext").write_text(
        f"subjectAltName={san}\nbasicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
        "authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n"
    )
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.crt", "-days", "1", "-extfile", "server.ext", cwd=directory)
    return {"ca": directory / "ca.crt", "cert": directory / "server.crt", "key": directory / "server.key"}


class TlsRedis:
    """A redis-server that speaks TLS only (`--port 0 --tls-port P`), with requirepass; stopped by `stop()`."""

    def __init__(self, directory: Path, host: str, certs: dict[str, Path]):
        self.directory, self.host, self.certs = directory, host, certs
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, password: str | None = PASSWORD, ca: bool = True) -> str:
        auth = f":{quote(password, safe='')}@" if password else ""
        query = f"?ssl_ca_certs={quote(str(self.certs['ca']))}" if ca else ""
        return f"rediss://{auth}{self.host}:{self.port}/0{query}"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        conf = self.directory / "tls.conf"
        conf.write_text(f'requirepass "{PASSWORD}"\n')
        conf.chmod(0o600)
        log = self.directory / "redis.log"
        args = [
            find_redis_server(), str(conf), "--port", "0", "--tls-port", str(self.port), "--bind", self.host,
            "--tls-cert-file", str(self.certs["cert"]), "--tls-key-file", str(self.certs["key"]),
            "--tls-ca-cert-file", str(self.certs["ca"]), "--tls-auth-clients", "no",
            "--save", "", "--appendonly", "no", "--dir", str(self.directory), "--daemonize", "no",
        ]  # fmt: skip
        with open(log, "ab") as out:
            self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                            start_new_session=True)
        probe = redis.Redis(host=self.host, port=self.port, password=PASSWORD, ssl=True,
                            ssl_ca_certs=str(self.certs["ca"]), socket_timeout=0.5, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 15
        try:
            while True:
                if self.process.poll() is not None:
                    text = log.read_text(errors="replace")
                    self.process = None
                    if "tls" in text.lower() and ("bad directive" in text.lower() or "not supported" in text.lower()):
                        pytest.skip(f"this redis-server was built without TLS: {text.strip().splitlines()[-1]}")
                    raise RuntimeError(f"TLS redis-server did not start: {text[-2000:]}")
                try:
                    if probe.ping():
                        return
                except (redis.ConnectionError, redis.TimeoutError, OSError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"TLS redis-server gave no PING answer; log: {log.read_text()[-2000:]}")
                time.sleep(0.05)
        finally:
            probe.close()

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(params=["loopback", "off-loopback"])
def tls_server(request, tmp_path: Path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: cannot make a test certificate")
    if request.param == "off-loopback" and NON_LOOPBACK is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    host = "127.0.0.1" if request.param == "loopback" else NON_LOOPBACK
    certs = make_certs(tmp_path / "certs", ["127.0.0.1", *([NON_LOOPBACK] if NON_LOOPBACK else [])])
    server = TlsRedis(tmp_path / "redis", host, certs)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.mark.integration
def test_rediss_end_to_end_through_the_client(tls_server: TlsRedis):
    from renderfarm.client import FarmClient

    url = tls_server.url()
    client = connect(url)  # off loopback too: the probe without a password is refused over TLS
    try:
        assert client.ping()
        assert client.connection_pool.connection_kwargs.get("ssl_ca_certs") == str(tls_server.certs["ca"])
    finally:
        client.close()
    farm = FarmClient(url, key_prefix="tls")
    job_id = farm.submit({"model": "tiny-sd15", "prompt": "a fox over TLS", "width": 64, "height": 64, "steps": 2})
    job = farm.job(job_id)
    assert job.state.value == "queued" and job.spec.prompt == "a fox over TLS"
    assert farm.status()["counts"]["queued"] == 1
    assert farm.cancel([job_id]) == {job_id: "cancelled (was queued)"}

    # Without the CA the certificate is not trusted; plain redis:// cannot talk to a TLS port; no password: refused.
    with pytest.raises(RedisUnavailable) as info:
        connect(tls_server.url(ca=False), socket_timeout=2)
    assert "certificate" in str(info.value).lower() and PASSWORD not in str(info.value)
    with pytest.raises(RedisUnavailable):
        connect(f"redis://:{PASSWORD}@{tls_server.host}:{tls_server.port}/0", socket_timeout=2)
    with pytest.raises(RedisUnavailable) as info:
        connect(tls_server.url(password=None), socket_timeout=2)
    assert "wants a password" in str(info.value)
