"""Webhooks' pure parts: signing and verify, URL checks (a property test over malformed URLs), the backoff
schedule, what records show of a URL, the body's bytes. No Redis, no network (one test opens a local socket)."""

from __future__ import annotations

import email.message
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from renderfarm.jobs import JobSpec, describe_validation_error
from renderfarm.webhook_urls import MAX_WEBHOOK_CHARS, webhook_private_problem, webhook_problem
from renderfarm.webhooks import SignatureError, post, redact_url, retry_delay, sign, signed_headers, verify
from renderfarm.webhooks.payloads import encode

BODY = b'{"event":"job.done","job":{"id":"j1"}}'


def headers_for(secrets=("s3cret",), body=BODY, timestamp=1_700_000_000):
    return signed_headers(secrets, body, delivery="d1", event="job.done", timestamp=timestamp)


# --- signing -----------------------------------------------------------------------------------------------


def test_a_signed_delivery_verifies():
    headers = headers_for()
    assert headers["X-Renderfarm-Timestamp"] == "1700000000"
    assert headers["X-Renderfarm-Signature"] == f"v1={sign('s3cret', 1_700_000_000, BODY)}"
    assert (headers["X-Renderfarm-Event"], headers["X-Renderfarm-Delivery"]) == ("job.done", "d1")
    assert headers["Content-Type"] == "application/json"
    verify("s3cret", headers, BODY, now=1_700_000_010)


def test_the_signature_is_hmac_sha256_of_timestamp_dot_body():
    import hashlib
    import hmac

    expected = hmac.new(b"k", b"123." + BODY, hashlib.sha256).hexdigest()
    assert sign("k", 123, BODY) == expected


@pytest.mark.parametrize("case", ["tampered body", "wrong secret", "stale", "future", "no signature",
                                  "no timestamp", "bad timestamp", "other scheme"])
def test_what_does_not_verify_is_refused_saying_why(case):
    headers, body, secret, now = headers_for(), BODY, "s3cret", 1_700_000_000
    if case == "tampered body":
        body = BODY.replace(b"j1", b"j2")
    elif case == "wrong secret":
        secret = "another"
    elif case == "stale":
        now += 301
    elif case == "future":
        now -= 301
    elif case == "no signature":
        del headers["X-Renderfarm-Signature"]
    elif case == "no timestamp":
        del headers["X-Renderfarm-Timestamp"]
    elif case == "bad timestamp":
        headers["X-Renderfarm-Timestamp"] = "yesterday"
    elif case == "other scheme":
        headers["X-Renderfarm-Signature"] = headers["X-Renderfarm-Signature"].replace("v1=", "v0=")
    with pytest.raises(SignatureError) as caught:
        verify(secret, headers, body, now=now)
    reason = str(caught.value)
    assert {"tampered body": "no signature matches", "wrong secret": "no signature matches", "stale": "replay",
            "future": "replay", "no signature": "missing", "no timestamp": "missing",
            "bad timestamp": "not a whole number", "other scheme": "no signature matches"}[case] in reason


def test_the_signed_timestamp_cannot_be_moved_forward():
    """A replay with a fresh timestamp header: the signature covers the timestamp, so it no longer matches."""
    headers = headers_for(timestamp=1_000)
    headers["X-Renderfarm-Timestamp"] = "1700000000"
    with pytest.raises(SignatureError, match="no signature matches"):
        verify("s3cret", headers, BODY, now=1_700_000_000)


def test_during_a_rotation_either_secret_verifies():
    headers = headers_for(("new", "old"))
    assert headers["X-Renderfarm-Signature"].count("v1=") == 2
    for secret in ("new", "old"):
        verify(secret, headers, BODY, now=1_700_000_000)
    with pytest.raises(SignatureError):
        verify("neither", headers, BODY, now=1_700_000_000)


def test_verify_reads_headers_in_any_case_from_any_mapping():
    message = email.message.Message()  # what http.server hands a handler (self.headers)
    for name, value in headers_for().items():
        message[name.lower()] = value
    verify("s3cret", message, BODY, now=1_700_000_000)
    verify("s3cret", {k.upper(): v for k, v in headers_for().items()}, BODY, now=1_700_000_000)


def test_a_delivery_needs_a_secret():
    with pytest.raises(ValueError):
        signed_headers([], BODY, delivery="d", event="job.done")


# --- backoff -------------------------------------------------------------------------------------------------


def test_the_backoff_doubles_from_one_second_up_to_its_cap():
    assert [retry_delay(n) for n in range(1, 10)] == [1, 2, 4, 8, 16, 32, 64, 120, 120]
    assert retry_delay(0) == 0 and retry_delay(3, base_s=0.5, cap_s=1.5) == 1.5
    assert retry_delay(10_000) == 120, "no overflow however many attempts"


# --- URLs ------------------------------------------------------------------------------------------------------


def spec_with(webhook, allow_private=False):
    class Rules:
        def allow_private_webhooks(self):
            return allow_private

    data = {"model": "tiny-sd15", "prompt": "a fox", "webhook": webhook}
    return JobSpec.model_validate(data, context={"webhooks": Rules()})


GOOD = ["https://hooks.example.com/render?token=abc", "http://example.com", "https://8.8.8.8:8443/x",
        "https://[2001:4860:4860::8888]/hook", "HTTPS://Example.COM/path#frag", "http://render-farm_hooks.example/"]
BAD = {
    "ftp://example.com/": "http:// or https://",
    "example.com/hook": "no scheme",
    "javascript:alert(1)": "http:// or https://",
    "https://user:pw@example.com/": "credentials",
    "https://user@example.com/": "credentials",
    "http:///path": "no host",
    "https://exa mple.com/": "whitespace",
    "https://example.com/\nX-Injected: 1": "whitespace",
    "https://example.com/\x00": "control character",
    "https://exämple.com/": "ASCII",
    "https://example.com:99999/": "not a valid URL",
    "https://example.com:abc/": "not a valid URL",
    "https://example.com:0/": "port 0",
    "https://[::1/": "not a valid URL",
    "https://-bad-.example/": "neither a host name",
    "https://" + "a" * MAX_WEBHOOK_CHARS + ".com/": "characters long",
    "": "empty",
}
PRIVATE = {
    "http://127.0.0.1:8080/": "loopback", "http://localhost/": "loopback name", "http://LOCALHOST./": "loopback name",
    "http://api.localhost/": "loopback name", "http://10.0.0.5/": "private", "http://192.168.1.2/": "private",
    "http://172.16.0.1/": "private", "http://169.254.169.254/latest/meta-data": "link-local",
    "http://[::1]/": "loopback", "http://[fe80::1]/": "link-local", "http://[fc00::1]/": "private",
    "http://[::ffff:10.0.0.1]/": "private", "http://0.0.0.0/": "unspecified", "http://224.0.0.1/": "multicast",
    "http://127.1/": "loopback", "http://2130706433/": "loopback", "http://0x7f.0.0.1/": "loopback",
    "http://100.64.0.1/": "not a public address", "http://240.0.0.1/": "reserved",
}


@pytest.mark.parametrize("url", GOOD)
def test_good_urls_pass(url):
    assert spec_with(url).webhook == url


@pytest.mark.parametrize("url,reason", sorted(BAD.items()))
def test_bad_urls_are_refused_naming_webhook_and_why(url, reason):
    with pytest.raises(ValidationError) as caught:
        spec_with(url, allow_private=True)
    line = describe_validation_error(caught.value)
    assert line.startswith("webhook: ") and reason in line, line


@pytest.mark.parametrize("url,reason", sorted(PRIVATE.items()))
def test_private_targets_are_refused_unless_the_farm_allows_them(url, reason):
    with pytest.raises(ValidationError) as caught:
        spec_with(url)
    line = describe_validation_error(caught.value)
    assert line.startswith("webhook: ") and reason in line and "webhook_allow_private" in line, line
    assert spec_with(url, allow_private=True).webhook == url


def test_a_stored_record_is_read_back_without_the_farm_rule():
    """The private rule is the farm's, judged at submit: a record accepted under it must still parse."""
    spec = spec_with("http://10.0.0.5/hook", allow_private=True)
    assert JobSpec.model_validate_json(spec.model_dump_json()).webhook == "http://10.0.0.5/hook"


def test_a_webhook_must_be_a_string():
    for value in (42, b"https://example.com/", ["https://example.com/"], {"url": "x"}):
        with pytest.raises(ValidationError) as caught:
            spec_with(value)
        assert describe_validation_error(caught.value).startswith("webhook: ")


# Malformed URLs built from parts: schemes, credentials, hosts, ports and paths that go wrong in every way a
# hurried script writes them, and any text at all.
SCHEMES = st.sampled_from(["http", "https", "HTTP", "ftp", "file", "javascript", "", "http:", "https:/", "ws"])
HOSTS = st.one_of(
    st.sampled_from(["example.com", "", "localhost", "127.0.0.1", "10.1.2.3", "[::1]", "[::1", "::1", "a..b",
                     "-x.com", "x" * 300, "ex ample.com", "exa\tmple.com", "ex\u00e4mple.com", "exa/mple", "@",
                     "[zz]", "0x7f.1", "999.999.999.999", "%00", "\u202e.com"]),
    st.text(alphabet=string.ascii_letters + string.digits + ".-_[]:%@", max_size=30),
)
PORTS = st.sampled_from(["", ":80", ":0", ":65536", ":-1", ":abc", ":", "::80", ":8080:90"])
USERINFO = st.sampled_from(["", "user@", "user:pw@", ":@", "@"])
PATHS = st.one_of(st.sampled_from(["", "/", "/hook?x=1", "/a b", "/\n", "/\x7f", "#f", "?q"]),
                  st.text(max_size=40))


def _acceptable(url: str) -> bool:
    """What every accepted URL must be, whatever produced it."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return (parts.scheme.lower() in ("http", "https") and bool(parts.hostname) and "@" not in parts.netloc
            and len(url) <= MAX_WEBHOOK_CHARS and url.isascii() and url.isprintable() and not any(
                c.isspace() for c in url) and webhook_private_problem(url) is None)


@settings(max_examples=600, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(
    st.builds(lambda s, u, h, p, path: f"{s}://{u}{h}{p}{path}", SCHEMES, USERINFO, HOSTS, PORTS, PATHS),
    st.builds(lambda s, rest: f"{s}:{rest}", SCHEMES, st.text(max_size=60)),
    st.text(max_size=80),
))
def test_property_every_url_is_accepted_sound_or_refused_naming_webhook(url):
    try:
        spec = spec_with(url)
    except ValidationError as exc:
        line = describe_validation_error(exc)
        assert line.startswith("webhook: ") and len(line) < 400, line
        return
    assert _acceptable(spec.webhook), f"accepted a URL it should not have: {url!r}"


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(SCHEMES, USERINFO, HOSTS, PORTS, PATHS)
def test_property_what_syntax_refuses_is_never_an_exception(scheme, userinfo, host, port, path):
    url = f"{scheme}://{userinfo}{host}{port}{path}"
    problem = webhook_problem(url)  # None or a reason, never an exception
    assert problem is None or isinstance(problem, str)
    if userinfo:
        assert problem is not None, f"credentials accepted in {url!r}"


# --- what the sender refuses before connecting, what records show ------------------------------------------------


def test_the_sender_refuses_a_private_target_without_connecting():
    result = post("http://127.0.0.1:9/hook", BODY, headers_for(), timeout_s=1, allow_private=False)
    assert result.refused and result.status is None and "loopback" in result.error
    result = post("ftp://example.com/", BODY, headers_for(), timeout_s=1, allow_private=True)
    assert result.refused and "http:// or https://" in result.error


def test_the_sender_reports_a_refused_connection_as_a_retryable_failure():
    import socket

    with socket.socket() as sock:  # a port that is free, and nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = post(f"http://127.0.0.1:{port}/", BODY, headers_for(), timeout_s=2, allow_private=True)
    assert not result.delivered and not result.refused and "cannot connect" in result.error


def test_records_show_urls_without_query_or_fragment():
    assert redact_url("https://h.example.com:8443/p/q?token=secret#frag") == "https://h.example.com:8443/p/q?..."
    assert redact_url("http://[::1]/x") == "http://[::1]/x"
    assert redact_url("https://example.com") == "https://example.com"


def test_the_body_is_the_same_bytes_every_time():
    body = {"b": 1, "a": {"z": "é", "y": [1, 2]}}
    assert encode(body) == encode(dict(reversed(list(body.items()))))
    assert encode(body) == '{"a":{"y":[1,2],"z":"é"},"b":1}'.encode()
