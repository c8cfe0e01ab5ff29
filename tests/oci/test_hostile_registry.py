"""Registries that attack the client: bombs, endless bodies, loops, trickles, hostile realms and digests.

Every server here is a small threaded HTTP server on 127.0.0.1 started and stopped by its test; a
name outside loopback only ever appears in a URL the client must refuse before connecting.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
from _support import HostileServer, answer, gzip_bomb
from supermachine.errors import AuthenticationError, ManifestError, RegistryError
from supermachine.oci import Credentials, ImageStore, Manifest, Reference, RegistryClient, pull
from supermachine.oci.auth import check_realm
from supermachine.oci.manifest import MAX_LAYERS, OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST, Descriptor

Respond = Callable[[HostileServer, http.server.BaseHTTPRequestHandler], None]
BOMB_BYTES = 256 << 20  # what the bombs expand to; far above every cap
MEMORY_BOUND = 48 << 20  # loose: the caps are 4 MiB and below


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return gzip_bomb(BOMB_BYTES)


def _one_line(exc: BaseException) -> str:
    message = str(exc)
    assert message and "\n" not in message and "Traceback" not in message
    assert "HTTPConnectionPool" not in message and "object at 0x" not in message
    assert len(message) < 400, message
    return message


def _peak_memory(fn: Callable[[], object]) -> tuple[int, BaseException | None]:
    """Peak Python heap growth while ``fn`` runs, and what it raised."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        error: BaseException | None = None
        try:
            fn()
        except Exception as exc:
            error = exc
        return tracemalloc.get_traced_memory()[1] - base, error
    finally:
        tracemalloc.stop()


def _manifest(config: dict[str, object], layers: list[dict[str, object]]) -> bytes:
    return json.dumps(
        {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": layers}
    ).encode()


def _serve_manifest(body: bytes) -> Respond:
    def respond(server: HostileServer, h: http.server.BaseHTTPRequestHandler) -> None:
        if "/manifests/" in h.path:
            answer(h, 200, body, {"Content-Type": OCI_MANIFEST})
        else:
            answer(h, 404)

    return respond


# ---- bounded bodies ---------------------------------------------------------------------------------------
def test_gzip_bomb_error_body_costs_bounded_memory(store: ImageStore, bomb: bytes) -> None:
    def respond(server: HostileServer, h: http.server.BaseHTTPRequestHandler) -> None:
        answer(h, 404, bomb, {"Content-Type": "application/json", "Content-Encoding": "gzip"})

    with HostileServer(respond) as server:
        peak, error = _peak_memory(lambda: pull(f"{server.host}/x/y:v1", retries=0))
    assert peak < MEMORY_BOUND, f"grew by {peak >> 20} MiB"
    assert isinstance(error, RegistryError)
    assert _one_line(error).startswith(f"manifest for {server.host}/x/y:v1 not found")


def test_gzip_bomb_token_response_costs_bounded_memory(store: ImageStore, bomb: bytes) -> None:
    def respond(server: HostileServer, h: http.server.BaseHTTPRequestHandler) -> None:
        if h.path.startswith("/token"):
            answer(h, 200, bomb, {"Content-Type": "application/json", "Content-Encoding": "gzip"})
        else:
            realm = f"http://{server.host}/token"
            answer(h, 401, b"", {"WWW-Authenticate": f'Bearer realm="{realm}",service="s"'})

    with HostileServer(respond) as server:
        peak, error = _peak_memory(lambda: pull(f"{server.host}/x/y:v1", retries=0))
    assert peak < MEMORY_BOUND, f"grew by {peak >> 20} MiB"
    assert isinstance(error, AuthenticationError)
    assert "sent an answer larger than" in _one_line(error)


def test_gzip_bomb_redirect_body_is_never_read(store: ImageStore, bomb: bytes) -> None:
    def respond(server: HostileServer, h: http.server.BaseHTTPRequestHandler) -> None:
        if h.path.endswith("/v1"):
            headers = {"Location": h.path[:-3] + "/v2", "Content-Encoding": "gzip"}
            answer(h, 302, bomb, headers)
        else:
            answer(h, 404, b'{"errors": [{"code": "MANIFEST_UNKNOWN", "message": "gone"}]}')

    with HostileServer(respond) as server:
        peak, error = _peak_memory(lambda: pull(f"{server.host}/x/y:v1", retries=0))
    assert peak < MEMORY_BOUND, f"grew by {peak >> 20} MiB"
    assert isinstance(error, RegistryError)
    assert _one_line(error).endswith("not found (MANIFEST_UNKNOWN: gone)")


@pytest.mark.timeout(60)
def test_endless_chunked_error_body_stops_at_the_cap(store: ImageStore) -> None:
    def respond(server: HostileServer, h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(404)
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        chunk = b"x" * 65536
        while True:  # until the client hangs up
            h.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))

    with HostileServer(respond) as server, pytest.raises(RegistryError) as info:
        pull(f"{server.host}/x/y:v1", retries=0)
    assert _one_line(info.value).endswith("not found (Not Found)")


@pytest.mark.timeout(60)
def test_endless_chunked_manifest_is_refused(store: ImageStore) -> None:
    def respond(server: HostileServer, h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Transfer-Encoding", "chunked")
        h.send_header("Content-Type", OCI_MANIFEST)
        h.end_headers()
        chunk = b" " * 65536
        while True:
            h.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))

    with HostileServer(respond) as server, pytest.raises(RegistryError, match="larger than 4194304") as info:
        pull(f"{server.host}/x/y:v1", retries=0)
    _one_line(info.value)


def test_error_text_from_the_registry_is_made_printable(store: ImageStore) -> None:
    hostile = "\x1b]0;owned\x07\x1b[2J line one\nline two\r" + "x" * 5000
    body = json.dumps({"errors": [{"code": "DENIED", "message": hostile}]}).encode()
    with HostileServer(lambda s, h: answer(h, 403, body)) as server, pytest.raises(RegistryError) as info:
        pull(f"{server.host}/x/y:v1", retries=0)
    message = _one_line(info.value)
    assert message.isprintable(), repr(message)
    assert "DENIED: ]0;owned [2J line one line two xxx" in message


# ---- redirects ------------------------------------------------------------------------------------------
def test_redirect_loop_is_one_line(store: ImageStore) -> None:
    def respond(server: HostileServer, h: http.server.BaseHTTPRequestHandler) -> None:
        answer(h, 302, b"", {"Location": h.path})

    with HostileServer(respond) as server:
        with pytest.raises(RegistryError) as info:
            pull(f"{server.host}/x/y:v1", retries=0)
        assert len(server.requests) < 10
    assert _one_line(info.value) == f"too many redirects from registry {server.host}"


def test_credentials_do_not_follow_a_redirect_to_another_host(store: ImageStore) -> None:
    """Basic credentials (to the token server) and the bearer token (to the registry) stay with
    their hosts when either redirects elsewhere ("localhost" is another host than "127.0.0.1")."""
    with HostileServer(lambda s, h: answer(h, 404)) as elsewhere:

        def respond(server: HostileServer, h: http.server.BaseHTTPRequestHandler) -> None:
            if h.path.startswith("/token"):
                answer(h, 200, b'{"token": "tok-123", "expires_in": 300}')
            elif h.path.startswith("/redirected-token"):
                answer(h, 302, b"", {"Location": f"http://{server.host}/token?scope=x"})
            elif h.headers.get("Authorization") != "Bearer tok-123":
                realm = f"http://{server.host}/redirected-token"
                answer(h, 401, b"", {"WWW-Authenticate": f'Bearer realm="{realm}"'})
            else:
                answer(h, 307, b"", {"Location": f"http://localhost:{elsewhere.port}{h.path}"})

        with HostileServer(respond) as server, pytest.raises(RegistryError, match="not found"):
            pull(f"{server.host}/x/y:v1", retries=0, credentials=Credentials("alice", "pw"))
        token_requests = [r for r in server.requests if r[1].startswith("/token")]
    assert token_requests and "Authorization" in token_requests[0][2]  # same host: kept
    assert elsewhere.requests, "the redirect was not followed"
    assert all("Authorization" not in headers for _, _, headers in elsewhere.requests)


# ---- deadlines ------------------------------------------------------------------------------------------
def _trickle(where: str) -> Respond:
    """Send one byte every 0.5 s: of the status line and headers, or of a 1000-byte body."""

    def respond(server: HostileServer, h: http.server.BaseHTTPRequestHandler) -> None:
        head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
        if where == "body":
            h.wfile.write(head)
            head = b""
        for byte in head + b" " * 1000:
            h.wfile.write(bytes([byte]))
            h.wfile.flush()
            time.sleep(0.5)

    return respond


@pytest.mark.parametrize("where", ["headers", "body"])
@pytest.mark.timeout(60)
def test_trickling_registry_hits_the_deadline(where: str) -> None:
    with HostileServer(_trickle(where)) as server:
        client = RegistryClient(Reference.parse(f"{server.host}/x/y:v1"), deadline=2.0, retries=0)
        started = time.monotonic()
        with pytest.raises(RegistryError) as info, client:
            client.get_manifest("x/y", "v1")
        elapsed = time.monotonic() - started
    assert elapsed < 2.0 + 3.0, f"took {elapsed:.1f} s"
    assert _one_line(info.value) == (
        f"registry {server.host} did not deliver manifest {server.host}/x/y:v1 within 2 s"
    )


@pytest.mark.timeout(60)
def test_trickling_registry_hits_the_deadline_when_pushing() -> None:
    """Asking whether a blob is there, and uploading a manifest, are bounded as pulling is."""
    desc = Descriptor(OCI_CONFIG, "sha256:" + "1" * 64, 2)
    with HostileServer(_trickle("headers")) as server:
        client = RegistryClient(Reference.parse(f"{server.host}/x/y:v1"), deadline=2.0, retries=0)
        with client:
            for call, message in (
                (lambda: client.blob_exists("x/y", desc), f"did not say whether it has blob {desc.digest}"),
                (
                    lambda: client.put_manifest("x/y", "v1", b"{}", OCI_MANIFEST),
                    "did not take manifest x/y:v1",
                ),
            ):
                started = time.monotonic()
                with pytest.raises(RegistryError) as info:
                    call()
                elapsed = time.monotonic() - started
                assert elapsed < 2.0 + 3.0, f"took {elapsed:.1f} s"
                assert _one_line(info.value) == f"registry {server.host} {message} within 2 s"


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
@pytest.mark.timeout(60)
def test_silent_registry_hits_the_deadline(tls: bool) -> None:
    """A server that accepts connections and never says a word (not even a TLS handshake)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # the kernel completes the TCP handshake; nobody ever reads
        host = f"127.0.0.1:{listener.getsockname()[1]}"
        client = RegistryClient(Reference.parse(f"{host}/x/y:v1"), insecure=not tls, deadline=2.0, retries=0)
        started = time.monotonic()
        with pytest.raises(RegistryError) as info, client:
            client.get_manifest("x/y", "v1")
        elapsed = time.monotonic() - started
    assert elapsed < 2.0 + 3.0, f"took {elapsed:.1f} s"
    assert _one_line(info.value) == f"registry {host} did not deliver manifest {host}/x/y:v1 within 2 s"


@pytest.mark.timeout(60)
def test_trickling_blob_hits_its_deadline(store: ImageStore) -> None:
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"diff_ids": []}}).encode()
    digest = "sha256:" + hashlib.sha256(config).hexdigest()
    manifest = _manifest({"mediaType": OCI_CONFIG, "digest": digest, "size": len(config)}, [])

    def respond(server: HostileServer, h: http.server.BaseHTTPRequestHandler) -> None:
        if "/manifests/" in h.path:
            answer(h, 200, manifest, {"Content-Type": OCI_MANIFEST})
            return
        h.send_response(200)
        h.send_header("Content-Length", str(len(config)))
        h.end_headers()
        for byte in config:
            h.wfile.write(bytes([byte]))
            h.wfile.flush()
            time.sleep(0.5)

    with HostileServer(respond) as server:
        client = RegistryClient(Reference.parse(f"{server.host}/x/y:v1"), deadline=2.0, retries=3)
        from supermachine.oci.manifest import Descriptor

        desc = Descriptor(OCI_CONFIG, digest, len(config))
        started = time.monotonic()
        with client, store.blobs.lock(digest):
            writer = store.blobs.writer(digest, len(config))
            with pytest.raises(RegistryError) as info:
                client.fetch_blob("x/y", desc, writer)
            writer.close()
        elapsed = time.monotonic() - started
    budget = client.blob_deadline(len(config))
    assert elapsed < budget + 3.0, f"took {elapsed:.1f} s"
    assert "did not arrive within" in _one_line(info.value)


# ---- token realms ---------------------------------------------------------------------------------------
def test_plain_http_realm_on_another_host_gets_no_credentials(
    store: ImageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The realm names a host that is not loopback, over plain HTTP: refused before any connection.

    Any request the client did make to that host would go through the recording proxy (all on
    loopback), so an empty proxy log proves nothing was sent.
    """
    with HostileServer(lambda s, h: answer(h, 502)) as proxy:
        monkeypatch.setenv("HTTP_PROXY", f"http://{proxy.host}")
        monkeypatch.setenv("http_proxy", f"http://{proxy.host}")
        monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
        monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")

        def respond(server: HostileServer, h: http.server.BaseHTTPRequestHandler) -> None:
            realm = "http://registry.invalid/token"
            answer(h, 401, b"", {"WWW-Authenticate": f'Bearer realm="{realm}",service="s"'})

        with HostileServer(respond) as server:
            with pytest.raises(AuthenticationError) as info:
                pull(f"{server.host}/x/y:v1", retries=0, credentials=Credentials("alice", "s3cret"))
            assert len(server.requests) == 1
        assert proxy.requests == []
    message = _one_line(info.value)
    assert "token server on plain HTTP (http://registry.invalid/token)" in message
    assert "refusing to send credentials" in message


def test_realm_policy() -> None:
    allowed = [
        ("https://auth.example.com/token", None),
        ("http://127.0.0.1:5001/token", None),
        ("http://[::1]:5001/token", None),
        ("http://localhost/token", None),
        ("http://reg.lan:5001/token", "reg.lan"),  # the user chose plain HTTP for this very host
    ]
    for realm, plain_host in allowed:
        assert check_realm(realm, "reg", plain_host) == realm
    for realm, plain_host in [
        ("http://auth.example.com/token", None),
        ("http://auth.example.com/token", "reg.lan"),
        ("ftp://127.0.0.1/token", None),
        ("file:///etc/passwd", None),
        ("not a url", None),
    ]:
        with pytest.raises(AuthenticationError) as info:
            check_realm(realm, "reg", plain_host)
        _one_line(info.value)


# ---- failures as plain lines ----------------------------------------------------------------------------
def test_connection_refused_through_the_cli_is_one_plain_line(store: ImageStore) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket is closed
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "python")}
    proc = subprocess.run(
        [sys.executable, "-m", "supermachine", "pull", f"127.0.0.1:{port}/x:y"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode != 0
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"error: cannot connect to registry 127.0.0.1:{port}: connection refused")
    assert "Traceback" not in proc.stderr and "HTTPConnectionPool" not in proc.stderr


def test_tls_failure_is_one_plain_line() -> None:
    """HTTPS forced against a server that only speaks plain HTTP: the handshake fails, once."""
    with HostileServer(lambda s, h: answer(h, 404)) as server:
        client = RegistryClient(Reference.parse(f"{server.host}/x/y:v1"), insecure=False, retries=3)
        with pytest.raises(RegistryError) as info, client:
            client.get_manifest("x/y", "v1")
    message = _one_line(info.value)
    assert message.startswith(f"TLS error talking to registry {server.host}: "), message
    assert "failed after" not in message  # a TLS failure is not retried


# ---- hostile documents ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "digest",
    [
        "sha256:../../../../../../tmp/owned",
        "sha256:" + "a" * 63,
        "sha256:" + "A" * 64,
        "md5:" + "a" * 32,
        "sha512:" + "a" * 128,
        "sha256:" + "a" * 64 + "/../x",
        "sha256:" + "a" * 1_000_000,
    ],
)
def test_hostile_digest_is_refused_before_touching_the_filesystem(store: ImageStore, digest: str) -> None:
    config = {"mediaType": OCI_CONFIG, "digest": "sha256:" + "1" * 64, "size": 2}
    for doc in (
        _manifest(config, [{"mediaType": OCI_LAYER_GZIP, "digest": digest, "size": 1}]),
        _manifest({**config, "digest": digest}, []),
    ):
        with HostileServer(_serve_manifest(doc)) as server:
            with pytest.raises(ManifestError, match="malformed digest") as info:
                pull(f"{server.host}/x/y:v1", retries=0)
            blob_requests = [r for r in server.requests if "/blobs/" in r[1]]
        _one_line(info.value)
        assert blob_requests == []
        assert not store.blobs.dir.exists() or list(store.blobs.dir.iterdir()) == []


@pytest.mark.parametrize("depth", [100, 100_000])
def test_deeply_nested_manifest_is_one_line(store: ImageStore, depth: int) -> None:
    doc = b'{"a":' * depth + b"1" + b"}" * depth
    server = HostileServer(_serve_manifest(doc))
    with server, pytest.raises(ManifestError, match="nests deeper than 64 levels") as info:
        pull(f"{server.host}/x/y:v1", retries=0)
    _one_line(info.value)


def test_manifest_limits() -> None:
    config = {"mediaType": OCI_CONFIG, "digest": "sha256:" + "1" * 64, "size": 2}
    layer = {"mediaType": OCI_LAYER_GZIP, "digest": "sha256:" + "2" * 64, "size": 1}
    assert len(Manifest.parse(_manifest(config, [layer] * MAX_LAYERS)).layers) == MAX_LAYERS
    cases = [
        (_manifest(config, [layer] * (MAX_LAYERS + 1)), f"more than the {MAX_LAYERS} supported"),
        (_manifest({**config, "size": 1 << 30}, [layer]), "config is 1073741824 bytes"),
        (_manifest({**config, "mediaType": "application/vnd.cncf.helm.config.v1+json"}, []), "not a contai"),
        (_manifest(config, [{**layer, "mediaType": "text/plain\n" + "x" * 10_000}]), "invalid media type"),
        (b" " * (5 << 20), "larger than 4194304 bytes"),
        (b'{"schemaVersion": ' + b"2" * 5000 + b"}", "number too long"),
    ]
    for raw, pattern in cases:
        with pytest.raises(ManifestError, match=pattern) as info:
            Manifest.parse(raw)
        _one_line(info.value)
