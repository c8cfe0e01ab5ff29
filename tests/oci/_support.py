"""Real test infrastructure for the OCI work: registries, a token server, proxies, image builders.

Everything here runs real programs (``docker-registry``, ``umoci``, ``skopeo``, ``openssl``) or real
HTTP servers on loopback; nothing is mocked. Shared by ``tests/oci`` and ``benches``.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import http.client
import http.server
import io
import ipaddress
import json
import os
import select
import shutil
import socket
import ssl
import stat
import subprocess
import tarfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard

TOOLS = ("docker-registry", "umoci", "skopeo", "mksquashfs", "unsquashfs", "htpasswd", "openssl")


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
    kw.setdefault("text", True)
    proc = subprocess.run(cmd, capture_output=True, check=False, **kw)
    if proc.returncode != 0:
        detail = proc.stderr or proc.stdout
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {detail!r}")
    return proc


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


# ---- docker-registry ---------------------------------------------------------------------------------
@dataclass
class Registry:
    """A running ``docker-registry`` on 127.0.0.1 with its own config and storage."""

    root: Path
    port: int
    proc: subprocess.Popen[bytes]
    credentials: tuple[str, str] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def storage(self) -> Path:
        return self.root / "storage"

    def blob_data(self, digest: str) -> Path:
        hex_ = digest.split(":", 1)[1]
        return self.storage / "docker/registry/v2/blobs/sha256" / hex_[:2] / hex_ / "data"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_registry(root: Path, auth: dict[str, Any] | None = None) -> Registry:
    """Start ``docker-registry`` with storage under ``root``; ``auth`` is the config's ``auth:`` section."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "error", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(root / "storage")}, "delete": {"enabled": True}},
        "http": {"addr": f"127.0.0.1:{port}", "secret": "test-secret"},
    }
    if auth:
        config["auth"] = auth
    (root / "config.yml").write_text(json.dumps(config))  # JSON is valid YAML
    log = open(root / "registry.log", "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(["docker-registry", "serve", str(root / "config.yml")], stdout=log, stderr=log)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"docker-registry exited: {(root / 'registry.log').read_text()[-2000:]}")
        with contextlib.suppress(OSError, http.client.HTTPException):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/v2/")
            status = conn.getresponse().status
            conn.close()
            if status in (200, 401):
                return Registry(root, port, proc)
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("docker-registry did not start")


# ---- loopback HTTP servers -------------------------------------------------------------------------------
def serve(
    handler: type[http.server.BaseHTTPRequestHandler], tls: ssl.SSLContext | None = None
) -> http.server.ThreadingHTTPServer:
    """``handler`` served on 127.0.0.1 (a free port) by a daemon thread, over TLS with ``tls``.
    Handler threads are daemons and are not waited for, so a trickling handler ends with its client."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    if tls is not None:
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    httpd.daemon_threads = True
    httpd.block_on_close = False
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def shut(httpd: http.server.ThreadingHTTPServer | None) -> None:
    """Stop a server made by :func:`serve` and close its socket."""
    if httpd is not None:
        httpd.shutdown()
        httpd.server_close()


# ---- a JWT token server (Docker registry token auth) ---------------------------------------------------
def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """Issues RS256 JWTs signed with a throwaway key (via ``openssl``) to one user."""

    issuer = "supermachine-test-issuer"
    service = "supermachine-test-registry"

    def __init__(self, root: Path, username: str, password: str) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.key = root / "token.key"
        self.cert = root / "token.crt"
        run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                str(self.key),
                "-out",
                str(self.cert),
                "-days",
                "2",
                "-subj",
                "/CN=supermachine-test-token",
            ]
        )
        der = run(["openssl", "x509", "-in", str(self.cert), "-outform", "DER"], text=False).stdout
        self.x5c = base64.b64encode(der).decode()
        self.username, self.password = username, password
        self.requests: list[dict[str, Any]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                url = urllib.parse.urlparse(self.path)
                query = urllib.parse.parse_qs(url.query)
                auth = self.headers.get("Authorization", "")
                user = None
                if auth.startswith("Basic "):
                    user, _, pw = base64.b64decode(auth[6:]).decode().partition(":")
                    if (user, pw) != (server.username, server.password):
                        user = "<bad>"
                server.requests.append({"path": url.path, "query": query, "user": user})
                if user != server.username:
                    self.send_response(401)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = json.dumps(
                    {"token": server.sign(user, query.get("scope", [])), "expires_in": 300}
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = serve(Handler)
        self.port = self.httpd.server_address[1]

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def sign(self, subject: str, scopes: list[str]) -> str:
        access = []
        for scope in " ".join(scopes).split():
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]}
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": os.urandom(8).hex(),
            "access": access,
        }
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        sig = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.key)],
            input=signing_input.encode(),
            capture_output=True,
            check=True,
        ).stdout
        return f"{signing_input}.{_b64url(sig)}"

    def registry_auth(self) -> dict[str, Any]:
        return {
            "token": {
                "realm": self.realm,
                "service": self.service,
                "issuer": self.issuer,
                "rootcertbundle": str(self.cert),
            }
        }

    def stop(self) -> None:
        shut(self.httpd)


# ---- a misbehaving proxy ---------------------------------------------------------------------------------
@dataclass
class FaultyProxy:
    """An HTTP proxy in front of a registry that can cut blob responses and rewrite manifests.

    ``cut_after``: the first GET of each blob (without Range) is closed after that many body bytes.
    ``manifest_body``: if set, every manifest response body is replaced by it.
    """

    upstream: str
    cut_after: int | None = None
    manifest_body: bytes | None = None
    log: list[tuple[str, str | None, int]] = field(default_factory=list)  # (path, Range, status)
    _cut: set[str] = field(default_factory=set)
    port: int = 0
    httpd: http.server.ThreadingHTTPServer | None = None

    def start(self) -> FaultyProxy:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
                conn.request("GET", self.path, headers=headers)
                up = conn.getresponse()
                rng = self.headers.get("Range")
                proxy.log.append((self.path, rng, up.status))
                body = up.read()  # as sent: http.client does not decode
                conn.close()
                is_blob = "/blobs/" in self.path and up.status == 200
                if "/manifests/" in self.path and up.status == 200 and proxy.manifest_body is not None:
                    body = proxy.manifest_body
                self.send_response(up.status)
                for k, v in up.headers.items():
                    if k.lower() not in (
                        "content-length",
                        "connection",
                        "transfer-encoding",
                        "content-encoding",
                    ):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if is_blob and proxy.cut_after is not None and rng is None and self.path not in proxy._cut:
                    proxy._cut.add(self.path)
                    self.wfile.write(body[: proxy.cut_after])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = serve(Handler)
        self.port = self.httpd.server_address[1]
        return self

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        shut(self.httpd)


_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
    }
)


@dataclass
class ForwardProxy:
    """A forward HTTP proxy on 127.0.0.1, as a company network has one: requests with an absolute URI
    for plain HTTP, ``CONNECT`` tunnels for HTTPS.

    ``hosts`` maps the host names it may be asked for to the loopback address to reach instead (so a
    client sees a name that is not loopback); any other name is refused with 502, so nothing leaves
    the machine. Every request is logged as ``(method, target, Proxy-Authorization or None)``.
    """

    hosts: dict[str, str]
    log: list[tuple[str, str, str | None]] = field(default_factory=list)
    port: int = 0
    httpd: http.server.ThreadingHTTPServer | None = None

    def start(self) -> ForwardProxy:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _upstream(self, host: str, port: int) -> tuple[str, int] | None:
                proxy.log.append((self.command, self.path, self.headers.get("Proxy-Authorization")))
                address = proxy.hosts.get(host)
                if address is None:
                    self.send_error(502, f"no route to {host}")
                    return None
                return address, port

            def do_CONNECT(self) -> None:
                host, _, port = self.path.rpartition(":")
                upstream = self._upstream(host, int(port))
                if upstream is None:
                    return
                with socket.create_connection(upstream, timeout=30) as far:
                    self.send_response(200, "Connection established")
                    self.end_headers()
                    _pipe(self.connection, far)
                self.close_connection = True

            def _forward(self) -> None:
                target = urllib.parse.urlsplit(self.path)
                if target.scheme != "http" or not target.hostname:
                    self.send_error(400, "a proxy needs an absolute http:// URI")
                    return
                upstream = self._upstream(target.hostname, target.port or 80)
                if upstream is None:
                    return
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                conn = http.client.HTTPConnection(*upstream, timeout=30)
                path = target.path + (f"?{target.query}" if target.query else "")
                conn.request(self.command, path, body=body, headers=headers)
                up = conn.getresponse()
                data = up.read()
                conn.close()
                self.send_response(up.status, up.reason)
                for k, v in up.headers.items():
                    if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_HEAD = do_POST = do_PUT = _forward

        self.httpd = serve(Handler)
        self.port = self.httpd.server_address[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        shut(self.httpd)

    def __enter__(self) -> ForwardProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _pipe(a: socket.socket, b: socket.socket) -> None:
    """Copy bytes both ways between ``a`` and ``b`` until both directions are closed."""
    open_ends = {a: b, b: a}
    while open_ends:
        readable, _, _ = select.select(list(open_ends), [], [], 30)
        if not readable:
            return
        for src in readable:
            data = src.recv(1 << 16)
            if data:
                open_ends[src].sendall(data)
                continue
            with contextlib.suppress(OSError):
                open_ends[src].shutdown(socket.SHUT_WR)
            del open_ends[src]


def self_signed_certificate(directory: Path, host: str) -> tuple[Path, Path]:
    """``(certificate, key)`` for ``host`` (a name or an address), made by ``openssl``; the
    certificate is its own CA."""
    cert, key = directory / f"{host}.crt", directory / f"{host}.key"
    try:
        ipaddress.ip_address(host)
        san = f"IP:{host}"
    except ValueError:
        san = f"DNS:{host}"
    curve = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2")
    subject = ("-subj", f"/CN={host}", "-addext", f"subjectAltName={san}")
    run(["openssl", "req", "-x509", *curve, *subject, "-keyout", str(key), "-out", str(cert)])
    return cert, key


# ---- building images with real tools --------------------------------------------------------------------
def busybox_rootfs(dest: Path, applets: tuple[str, ...] = ("sh", "ls", "cat", "echo", "true")) -> Path:
    """A minimal root filesystem: the static busybox with applet symlinks and a few config files."""
    (dest / "bin").mkdir(parents=True)
    shutil.copy2("/bin/busybox", dest / "bin" / "busybox")
    for applet in applets:
        os.symlink("busybox", dest / "bin" / applet)
    (dest / "etc").mkdir()
    (dest / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (dest / "etc" / "hostname").write_text("busybox\n")
    (dest / "tmp").mkdir(mode=0o1777)
    os.chmod(dest / "tmp", 0o1777)
    return dest


def full_busybox_rootfs(dest: Path, passwd: str, group: str, dirs: tuple[str, ...] = ()) -> Path:
    """A root filesystem with the static busybox and every applet, the given /etc/passwd and
    /etc/group, /tmp (1777) and the extra ``dirs``: a base image that RUN steps can use."""
    for d in ("bin", "etc", "tmp", "root", *dirs):
        (dest / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2("/bin/busybox", dest / "bin" / "busybox")
    applets = subprocess.run(["/bin/busybox", "--list"], capture_output=True, text=True, check=True).stdout
    for applet in applets.split():
        if applet != "busybox":
            os.symlink("busybox", dest / "bin" / applet)
    (dest / "etc" / "passwd").write_text(passwd)
    (dest / "etc" / "group").write_text(group)
    os.chmod(dest / "tmp", 0o1777)
    return dest


def private_cache(path: Path) -> Path:
    """A new, empty supermachine cache at ``path`` that shares only the built guest kernel, agent
    and initramfs with the user's (keyed by their inputs; rebuilding them would take minutes)."""
    from supermachine import paths

    path.mkdir(parents=True)
    shared = paths.cache_dir()
    for artefact in ("kernels", "agent", "initramfs"):
        (shared / artefact).mkdir(parents=True, exist_ok=True)
        (path / artefact).symlink_to(shared / artefact)
    return path


def tree_metadata(root: Path, *, xattrs: bool = False, mtimes: bool = False) -> dict[str, tuple[object, ...]]:
    """What two root file systems are compared by, per path: type, mode, owner, and a regular
    file's content hash (with the first path of its inode when hard-linked), a link's target or a
    device's numbers; with ``xattrs`` its ``user.`` attributes, with ``mtimes`` a file's mtime."""
    out: dict[str, tuple[object, ...]] = {}
    inodes: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            st = path.lstat()
            extra: object = None
            if stat.S_ISREG(st.st_mode):
                extra = hashlib.sha256(path.read_bytes()).hexdigest()
                if st.st_nlink > 1:
                    extra = (extra, "linked-with", inodes.setdefault(st.st_ino, rel))
            elif stat.S_ISLNK(st.st_mode):
                extra = os.readlink(path)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                extra = (os.major(st.st_rdev), os.minor(st.st_rdev))
            row: tuple[object, ...] = (
                stat.S_IFMT(st.st_mode),
                oct(stat.S_IMODE(st.st_mode)),
                st.st_uid,
                st.st_gid,
                extra,
            )
            if xattrs:
                found = (
                    {}
                    if stat.S_ISLNK(st.st_mode)
                    else {k: os.getxattr(path, k) for k in os.listxattr(path) if k.startswith("user.")}
                )
                row += (found,)
            if mtimes:
                row += (int(st.st_mtime) if stat.S_ISREG(st.st_mode) else None,)
            out[rel] = row
    return out


def umoci_image(
    layout: Path, tag: str, rootfs: Path, work: Path, config: dict[str, str] | None = None
) -> None:
    """Create ``layout:tag`` (one layer holding ``rootfs``) with umoci, then set config options."""
    if not (layout / "oci-layout").exists():
        run(["umoci", "init", "--layout", str(layout)])
    run(["umoci", "new", "--image", f"{layout}:{tag}"])
    bundle = work / f"bundle-{tag}"
    run(["umoci", "unpack", "--image", f"{layout}:{tag}", str(bundle)])
    run(["cp", "-a", f"{rootfs}/.", str(bundle / "rootfs")])
    run(["umoci", "repack", "--image", f"{layout}:{tag}", str(bundle)])
    shutil.rmtree(bundle)
    if config:
        run(
            [
                "umoci",
                "config",
                "--image",
                f"{layout}:{tag}",
                *[f"--config.{k}={v}" for k, v in config.items()],
            ]
        )


def umoci_add_layer(layout: Path, tag: str, work: Path, mutate: Callable[[Path], None]) -> None:
    """Unpack ``layout:tag``, let ``mutate`` change the root filesystem, repack it as a new layer."""
    bundle = work / f"bundle-{tag}-{os.urandom(4).hex()}"
    run(["umoci", "unpack", "--image", f"{layout}:{tag}", str(bundle)])
    mutate(bundle / "rootfs")
    run(["umoci", "repack", "--image", f"{layout}:{tag}", str(bundle)])
    shutil.rmtree(bundle)


def skopeo_copy(src: str, dest: str, *extra: str, creds: tuple[str, str] | None = None) -> None:
    cmd = ["skopeo", "--insecure-policy", "copy", "-q", "--src-tls-verify=false", "--dest-tls-verify=false"]
    if creds:
        cmd += ["--dest-creds", f"{creds[0]}:{creds[1]}"]
    run([*cmd, *extra, src, dest])


# ---- hand-made layers and layouts (for cases tools will not produce) ---------------------------------------
@dataclass
class Entry:
    """One tar entry for :func:`make_layer`."""

    name: str
    kind: str = "file"  # file | dir | symlink | hardlink | char | block | fifo
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    target: str = ""
    xattrs: dict[str, str] = field(default_factory=dict)
    dev: tuple[int, int] = (0, 0)


def make_layer(entries: list[Entry], compression: str = "gzip") -> bytes:
    """A layer blob (tar, optionally gzip or zstd) with exactly ``entries``, in order."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.mode, info.uid, info.gid, info.mtime = e.mode, e.uid, e.gid, 1_700_000_000
            info.type = {
                "file": tarfile.REGTYPE,
                "dir": tarfile.DIRTYPE,
                "symlink": tarfile.SYMTYPE,
                "hardlink": tarfile.LNKTYPE,
                "char": tarfile.CHRTYPE,
                "block": tarfile.BLKTYPE,
                "fifo": tarfile.FIFOTYPE,
            }[e.kind]
            info.linkname = e.target
            info.devmajor, info.devminor = e.dev
            if e.xattrs:
                info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in e.xattrs.items()}
            if e.kind == "file":
                info.size = len(e.data)
                tar.addfile(info, io.BytesIO(e.data))
            else:
                tar.addfile(info)
    data = raw.getvalue()
    if compression == "gzip":
        return gzip.compress(data, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data


LAYER_MEDIA = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "none": "application/vnd.oci.image.layer.v1.tar",
}


def _uncompressed_digest(blob: bytes) -> str:
    if blob[:2] == b"\x1f\x8b":
        return sha256(gzip.decompress(blob))
    if blob[:4] == b"\x28\xb5\x2f\xfd":
        return sha256(zstandard.ZstdDecompressor().decompressobj().decompress(blob))
    return sha256(blob)


class LayoutWriter:
    """Writes an OCI image layout by hand: blobs, manifests, configs, indexes, tags."""

    def __init__(self, path: Path) -> None:
        self.path = path
        (path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        self.entries: list[dict[str, Any]] = []

    def blob(self, data: bytes, media_type: str) -> dict[str, Any]:
        digest = sha256(data)
        (self.path / "blobs" / "sha256" / digest[7:]).write_bytes(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    def image(
        self,
        layers: list[tuple[bytes, str]],
        *,
        arch: str = "amd64",
        config: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Write config and manifest for ``layers`` (blob, compression); returns the manifest descriptor."""
        cfg = {
            "architecture": arch,
            "os": "linux",
            "config": config or {},
            "rootfs": {"type": "layers", "diff_ids": [_uncompressed_digest(b) for b, _ in layers]},
        }
        cfg_desc = self.blob(json.dumps(cfg).encode(), "application/vnd.oci.image.config.v1+json")
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": cfg_desc,
            "layers": [self.blob(b, LAYER_MEDIA[c]) for b, c in layers],
        }
        desc = self.blob(json.dumps(manifest).encode(), manifest["mediaType"])
        desc["platform"] = {"architecture": arch, "os": "linux"}
        return desc

    def index(self, manifests: list[dict[str, Any]]) -> dict[str, Any]:
        doc = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests,
        }
        return self.blob(json.dumps(doc).encode(), doc["mediaType"])

    def tag(self, desc: dict[str, Any], name: str) -> None:
        entry = {k: v for k, v in desc.items() if k != "platform"}
        entry["annotations"] = {"org.opencontainers.image.ref.name": name}
        self.entries = [
            e for e in self.entries if e["annotations"]["org.opencontainers.image.ref.name"] != name
        ]
        self.entries.append(entry)
        (self.path / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": self.entries}))


def unsquashfs_list(image: Path) -> dict[str, str]:
    """``unsquashfs -lln``: path -> the listing line (permissions, owner, size ...)."""
    out = run(["unsquashfs", "-lln", "-d", "", str(image)]).stdout
    listing: dict[str, str] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 6 and parts[0][0] in "-dlcbps":
            path = line[line.index(" /") + 1 :] if " /" in line else parts[-1]
            listing[path.split(" -> ")[0]] = line
    return listing


def unsquashfs_extract(image: Path, dest: Path) -> Path:
    run(["unsquashfs", "-no-progress", "-d", str(dest), str(image)])
    return dest


@contextlib.contextmanager
def env(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---- hostile servers: registries that misbehave on purpose (loopback only) -----------------------------
@dataclass
class HostileServer:
    """A threaded HTTP/1.1 server on 127.0.0.1; ``respond(server, handler)`` answers every request.

    Every request is recorded as ``(method, path, headers)`` before it is answered.
    """

    respond: Callable[[HostileServer, http.server.BaseHTTPRequestHandler], None]
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    port: int = 0
    httpd: http.server.ThreadingHTTPServer | None = None
    tls: tuple[Path, Path] | None = None
    """``(certificate, key)`` to speak HTTPS with."""
    client_ca: Path | None = None
    """With ``tls``: a client must present a certificate this CA signed."""
    closed: list[int] = field(default_factory=list)
    """The client ports of the connections that have ended, in the order they ended."""

    def start(self) -> HostileServer:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self) -> None:
                server.requests.append((self.command, self.path, dict(self.headers.items())))
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    server.respond(server, self)

            do_GET = do_HEAD = do_POST = do_PUT = _answer

            def finish(self) -> None:
                with contextlib.suppress(OSError):
                    super().finish()
                server.closed.append(self.client_address[1])

        context = None
        if self.tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*self.tls)
            if self.client_ca is not None:
                context.verify_mode = ssl.CERT_REQUIRED
                context.load_verify_locations(cafile=self.client_ca)
        self.httpd = serve(Handler, context)
        self.port = self.httpd.server_address[1]
        return self

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        shut(self.httpd)

    def __enter__(self) -> HostileServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def answer(
    handler: http.server.BaseHTTPRequestHandler,
    status: int,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> None:
    """Send a complete response with a Content-Length."""
    handler.send_response(status)
    for key, value in (headers or {}).items():
        handler.send_header(key, value)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def gzip_bomb(expanded: int) -> bytes:
    """A gzip stream of ``expanded`` zero bytes (about a thousandth of that on the wire)."""
    out = io.BytesIO()
    zeros = bytes(1 << 20)
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=9, mtime=0) as f:
        for _ in range(expanded // len(zeros)):
            f.write(zeros)
    return out.getvalue()
