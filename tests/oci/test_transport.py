"""The HTTP transport under the registry client: kept-alive connections, connections a server
dropped, URLs, and proxies from the environment (a real forward proxy on loopback, plain HTTP and
HTTPS through a ``CONNECT`` tunnel with a real certificate)."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import time
from pathlib import Path

import pytest
from _support import ForwardProxy, HostileServer, Registry, answer, env, self_signed_certificate
from hypothesis import given, settings
from hypothesis import strategies as st
from supermachine.errors import RegistryError
from supermachine.oci import ImageStore, Reference, RegistryClient, pull
from supermachine.oci.transport import (
    InvalidURL,
    Origin,
    Proxy,
    ProxyError,
    new_session,
    origin_of,
    proxy_for,
    read_capped,
    send,
)

MANIFEST = json.dumps(
    {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json"}
).encode()
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"


def _serve_manifest(server: HostileServer, handler: http.server.BaseHTTPRequestHandler) -> None:
    answer(handler, 200, MANIFEST, {"Content-Type": MANIFEST_TYPE})


def _connections(server: HostileServer) -> int:
    return len({headers["X-Client-Port"] for _, _, headers in server.requests})


class _PortRecording:
    """Wraps a responder so each recorded request also names the client port it came from."""

    def __init__(self, respond: object) -> None:
        self.respond = respond

    def __call__(self, server: HostileServer, handler: http.server.BaseHTTPRequestHandler) -> None:
        server.requests[-1][2]["X-Client-Port"] = str(handler.client_address[1])
        self.respond(server, handler)  # type: ignore[operator]


# ---- connections ----------------------------------------------------------------------------------------
def test_connections_are_kept_alive_and_reused() -> None:
    with HostileServer(_PortRecording(_serve_manifest)) as server:
        with RegistryClient(Reference.parse(f"{server.host}/x/y:v1"), retries=0) as client:
            for _ in range(3):
                assert client.get_manifest("x/y", "v1")[0] == MANIFEST
        assert len(server.requests) == 3
        assert _connections(server) == 1


def _close_after_answering(server: HostileServer, handler: http.server.BaseHTTPRequestHandler) -> None:
    """Answers as if the connection stayed open (HTTP/1.1, no ``Connection: close``), then closes it."""
    _serve_manifest(server, handler)
    handler.close_connection = True


def _close_on_second_request(server: HostileServer, handler: http.server.BaseHTTPRequestHandler) -> None:
    """Answers a connection's first request; closes the connection on its second, unanswered (what a
    server's idle timeout does when it fires just as a request arrives)."""
    seen = getattr(handler, "answered", False)
    if seen:
        handler.close_connection = True
        return
    handler.answered = True  # type: ignore[attr-defined]
    _serve_manifest(server, handler)


@pytest.mark.parametrize("respond", [_close_after_answering, _close_on_second_request])
def test_a_kept_alive_connection_the_server_closed_is_replaced(respond: object) -> None:
    """No retries allowed: a connection the server dropped while it sat in the pool must not fail
    the next request."""
    with HostileServer(_PortRecording(respond)) as server:
        with RegistryClient(Reference.parse(f"{server.host}/x/y:v1"), retries=0) as client:
            for _ in range(3):
                assert client.get_manifest("x/y", "v1")[0] == MANIFEST
        assert _connections(server) == 3


def test_a_body_not_read_to_its_end_closes_its_connection() -> None:
    """An error body larger than what is read of it: the connection is not kept (nor drained)."""
    big = json.dumps({"errors": [{"code": "X", "message": "m"}], "pad": "x" * (200 << 10)}).encode()

    def respond(server: HostileServer, handler: http.server.BaseHTTPRequestHandler) -> None:
        answer(handler, 404, big, {"Content-Type": "application/json"})

    with HostileServer(_PortRecording(respond)) as server:
        with RegistryClient(Reference.parse(f"{server.host}/x/y:v1"), retries=0) as client:
            for _ in range(2):
                with pytest.raises(RegistryError, match="not found"):
                    client.get_manifest("x/y", "v1")
        assert _connections(server) == 2


def test_idle_connections_are_kept_for_the_origins_used_last() -> None:
    """A registry can redirect every blob to another host: the idle connections kept stay bounded
    (``pool_size`` origins), the oldest origin's are closed."""
    servers = [HostileServer(_serve_manifest).start() for _ in range(3)]
    session = new_session("test", pool_size=2)
    try:
        for server in servers:
            with send(session, "GET", f"http://{server.host}/v2/", headers={}, timeout=(5, 5)) as resp:
                assert read_capped(resp, 1 << 20) == MANIFEST
        deadline = time.monotonic() + 10
        while not servers[0].closed and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(servers[0].closed) == 1, "the oldest origin's idle connection was kept"
        assert servers[1].closed == servers[2].closed == []
    finally:
        session.close()
        for server in servers:
            server.stop()


# ---- URLs -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "origin"),
    [
        ("https://Registry.Example.com/v2/", Origin("https", "registry.example.com", 443)),
        ("http://127.0.0.1:5000/v2/x?y=1", Origin("http", "127.0.0.1", 5000)),
        ("http://[::1]:8080/", Origin("http", "::1", 8080)),
        ("https://user:pw@host/t", Origin("https", "host", 443)),  # credentials in a URL are never sent
    ],
)
def test_origin_of(url: str, origin: Origin) -> None:
    assert origin_of(url) == origin


@pytest.mark.parametrize(
    "url",
    [
        "ftp://host/x",
        "file:///etc/passwd",
        "http://",
        "http://exa mple.com/",
        "http://host:99999/",
        "http://host:0/",
        "http://a\\@c/",
        "//host/x",
    ],
)
def test_urls_that_are_not_requested(url: str) -> None:
    with pytest.raises(InvalidURL):
        origin_of(url)


_URL_PIECES = st.sampled_from(
    [
        *("http", "https", "HTTP", "ftp", ":", "//", "/", "@", "\\", "[", "]", "::1", "?", "#", "%", "%2f"),
        *("..", "a", "example.com", "127.0.0.1", "1", "0", "65535", "99999", " ", "\t", "\r\n", "\x00"),
        *("é", "user:pw"),
    ]
)


@settings(max_examples=2000, deadline=None)
@given(st.lists(_URL_PIECES, max_size=12).map("".join))
def test_any_url_parses_to_a_well_formed_origin_or_is_refused(url: str) -> None:
    """Registries choose redirect targets and token realms: whatever the text, a URL is refused
    with InvalidURL or names a scheme, a plain host and a port, written back the same way."""
    try:
        origin = origin_of(url)
    except InvalidURL:
        return
    assert origin.scheme in ("http", "https")
    assert 1 <= origin.port <= 65535
    assert origin.host and not set(origin.host) & set("@/\\[]%?# \t\r\n\x00")
    assert origin_of(f"{origin.scheme}://{origin.netloc}/") == origin


# ---- proxies from the environment -------------------------------------------------------------------------
HTTPS = Origin("https", "registry.example.com", 443)
HTTP = Origin("http", "registry.example.com", 5000)


@pytest.mark.parametrize(
    ("environ", "origin", "proxy"),
    [
        ({}, HTTPS, None),
        ({"https_proxy": "http://proxy:3128"}, HTTPS, Origin("http", "proxy", 3128)),
        ({"HTTPS_PROXY": "proxy:3128"}, HTTPS, Origin("http", "proxy", 3128)),
        ({"https_proxy": "http://proxy:3128"}, HTTP, None),
        ({"http_proxy": "http://p:1"}, HTTP, Origin("http", "p", 1)),
        ({"HTTP_PROXY": "http://p:1"}, HTTP, None),  # upper case: a CGI server sets it from a header
        ({"all_proxy": "http://p:1"}, HTTPS, Origin("http", "p", 1)),
        ({"https_proxy": "http://p:1", "all_proxy": "http://q:2"}, HTTPS, Origin("http", "p", 1)),
        ({"https_proxy": "http://p:1"}, Origin("https", "localhost", 443), None),
        ({"https_proxy": "http://p:1"}, Origin("https", "127.0.0.1", 443), None),
        ({"https_proxy": "http://p:1", "no_proxy": "example.com"}, HTTPS, None),
        ({"https_proxy": "http://p:1", "NO_PROXY": ".example.com"}, HTTPS, None),
        ({"https_proxy": "http://p:1", "no_proxy": "other.com, *"}, HTTPS, None),
        ({"https_proxy": "http://p:1", "no_proxy": "ample.com"}, HTTPS, Origin("http", "p", 1)),
        ({"https_proxy": "http://p:1", "no_proxy": "registry.example.com:443"}, HTTPS, None),
        ({"https_proxy": "http://p:1", "no_proxy": "10.0.0.0/8"}, Origin("https", "10.1.2.3", 443), None),
        (
            {"https_proxy": "http://p:1", "no_proxy": "10.0.0.0/8"},
            Origin("https", "11.1.2.3", 443),
            Origin("http", "p", 1),
        ),
    ],
)
def test_proxy_for_reads_the_environment_as_curl_does(
    environ: dict[str, str], origin: Origin, proxy: Origin | None
) -> None:
    found = proxy_for(origin, environ)
    assert (found.origin if found else None) == proxy


def test_proxy_credentials_become_a_proxy_authorization() -> None:
    found = proxy_for(HTTPS, {"https_proxy": "http://al%40ice:p%3Aw@proxy:3128"})
    assert found == Proxy(Origin("http", "proxy", 3128), "Basic " + base64.b64encode(b"al@ice:p:w").decode())


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("socks5://proxy:1080", "is not an http:// proxy"),
        ("https://proxy:3128", "is not an http:// proxy"),
        ("http://proxy:port", "is not a valid proxy URL"),
    ],
)
def test_unusable_proxy_settings_are_one_plain_line(value: str, message: str) -> None:
    with pytest.raises(ProxyError, match=message):
        proxy_for(HTTPS, {"https_proxy": value})
    with env(https_proxy=value):
        client = RegistryClient(Reference.parse("registry.example.com/x/y:v1"), retries=3)
        with pytest.raises(RegistryError) as info, client:
            client.get_manifest("x/y", "v1")
    text = str(info.value)
    assert text.startswith("cannot connect to registry registry.example.com: ") and message in text, text
    assert "failed after" not in text  # not retried


def test_pull_through_a_forward_proxy(registry: Registry, busybox_pushed: str, store: ImageStore) -> None:
    """Plain HTTP through the proxy: the client only ever talks to the proxy, which alone knows where
    ``registry.test`` is; the proxy sees absolute URIs and the credentials of the proxy URL."""
    direct = pull(busybox_pushed, store=store)
    via = busybox_pushed.replace("127.0.0.1:", "registry.test:", 1)
    with (
        ForwardProxy({"registry.test": "127.0.0.1"}) as proxy,
        env(http_proxy=proxy.url.replace("//", "//bob:pw@")),
    ):
        image = pull(via, insecure=True, store=ImageStore(store.root.parent / "via-proxy"))
    assert image.record.manifest_digest == direct.record.manifest_digest
    assert image.record.layers == direct.record.layers
    port = registry.port
    assert proxy.log and all(t.startswith(f"http://registry.test:{port}/v2/") for _, t, _ in proxy.log)
    assert {m for m, _, _ in proxy.log} == {"GET"}
    assert {a for _, _, a in proxy.log} == {"Basic " + base64.b64encode(b"bob:pw").decode()}


def test_https_through_a_connect_tunnel(tmp_path: Path) -> None:
    """HTTPS through the proxy: a CONNECT tunnel, then TLS with the registry itself, its certificate
    checked against the trust store (a test CA given by ``SSL_CERT_FILE``)."""
    cert = self_signed_certificate(tmp_path, "registry.test")
    with (
        HostileServer(_serve_manifest, tls=cert) as server,
        ForwardProxy({"registry.test": "127.0.0.1"}) as proxy,
        env(https_proxy=proxy.url, SSL_CERT_FILE=str(cert[0])),
    ):
        ref = Reference.parse(f"registry.test:{server.port}/x/y:v1")
        with RegistryClient(ref, retries=0) as client:
            raw, media_type, digest = client.get_manifest("x/y", "v1")
    assert raw == MANIFEST and media_type == MANIFEST_TYPE
    assert digest == "sha256:" + hashlib.sha256(MANIFEST).hexdigest()
    assert proxy.log == [("CONNECT", f"registry.test:{server.port}", None)]
    assert [path for _, path, _ in server.requests] == ["/v2/x/y/manifests/v1"]


def test_https_through_a_tunnel_still_checks_the_certificate(tmp_path: Path) -> None:
    """The same registry when the trust store does not hold its certificate: refused, in one line."""
    cert = self_signed_certificate(tmp_path, "registry.test")
    other = self_signed_certificate(tmp_path, "other.test")
    with (
        HostileServer(_serve_manifest, tls=cert) as server,
        ForwardProxy({"registry.test": "127.0.0.1"}) as proxy,
        env(https_proxy=proxy.url, SSL_CERT_FILE=str(other[0])),
    ):
        client = RegistryClient(Reference.parse(f"registry.test:{server.port}/x/y:v1"), retries=3)
        with pytest.raises(RegistryError) as info, client:
            client.get_manifest("x/y", "v1")
    text = str(info.value)
    assert text.startswith(
        f"TLS error talking to registry registry.test:{server.port}: certificate verify failed"
    ), text
    assert server.requests == []


# ---- per-registry certificates (certs.d) ----------------------------------------------------------------
def _certs_d(config: Path, host: str) -> Path:
    directory = config / "containers" / "certs.d" / host
    directory.mkdir(parents=True)
    return directory


def _manifest_over_tls(host: str) -> bytes:
    with RegistryClient(Reference.parse(f"{host}/x/y:v1"), insecure=False, retries=0) as client:
        return client.get_manifest("x/y", "v1")[0]


def test_a_ca_in_certs_d_is_trusted_for_its_registry_only(tmp_path: Path) -> None:
    """A registry with a private CA, the Docker way: ``certs.d/HOST:PORT/ca.crt`` (here the user's
    ``containers/certs.d``); the system's trust store does not know the CA."""
    cert = self_signed_certificate(tmp_path, "127.0.0.1")
    other = self_signed_certificate(tmp_path, "other.test")
    config = tmp_path / "config"
    with (
        HostileServer(_serve_manifest, tls=cert) as server,
        HostileServer(_serve_manifest, tls=cert) as elsewhere,
        env(XDG_CONFIG_HOME=str(config), SSL_CERT_FILE=str(other[0])),
    ):
        with pytest.raises(RegistryError, match="certificate verify failed"):
            _manifest_over_tls(server.host)
        (_certs_d(config, server.host) / "ca.crt").write_bytes(cert[0].read_bytes())
        assert _manifest_over_tls(server.host) == MANIFEST
        with pytest.raises(RegistryError, match="certificate verify failed"):
            _manifest_over_tls(elsewhere.host)  # the same CA, another port: not configured


def test_a_client_certificate_in_certs_d_is_presented(tmp_path: Path) -> None:
    server_cert = self_signed_certificate(tmp_path, "127.0.0.1")
    client_cert = self_signed_certificate(tmp_path, "client.test")
    config = tmp_path / "config"
    with (
        HostileServer(_serve_manifest, tls=server_cert, client_ca=client_cert[0]) as server,
        env(XDG_CONFIG_HOME=str(config)),
    ):
        directory = _certs_d(config, server.host)
        (directory / "ca.crt").write_bytes(server_cert[0].read_bytes())
        with pytest.raises(RegistryError, match=r"^TLS error talking to registry"):
            _manifest_over_tls(server.host)
        (directory / "client.cert").write_bytes(client_cert[0].read_bytes())
        (directory / "client.key").write_bytes(client_cert[1].read_bytes())
        assert _manifest_over_tls(server.host) == MANIFEST


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"ca.crt": b"not a certificate"}, "cannot use the certificates in "),
        ({"client.cert": b"x"}, "has no key"),
    ],
)
def test_unusable_certs_d_is_one_plain_line(files: dict[str, bytes], message: str, tmp_path: Path) -> None:
    config = tmp_path / "config"
    with HostileServer(_serve_manifest) as server, env(XDG_CONFIG_HOME=str(config)):
        directory = _certs_d(config, server.host)
        for name, data in files.items():
            (directory / name).write_bytes(data)
        with pytest.raises(RegistryError) as info:
            _manifest_over_tls(server.host)
    text = str(info.value)
    assert text.startswith(f"cannot connect to registry {server.host}: ") and message in text, text
    assert "\n" not in text and "failed after" not in text
