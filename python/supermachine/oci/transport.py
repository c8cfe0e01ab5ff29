"""HTTP plumbing for talking to untrusted registries and token servers.

Built on the standard library's :mod:`http.client` rather than a third-party client: every ``pull``
imports this module, and importing ``requests`` (or ``urllib3``) took longer than the whole download
of a small image. What it adds to :mod:`http.client`:

* **Keep-alive pools.** A :class:`Session` keeps a few idle connections per origin (and proxy) and
  hands them to concurrent downloads; a connection whose body was not read to its end is closed,
  never drained.
* **Bounded bodies.** :func:`read_capped` decodes a response body itself and stops at a cap, so a
  2 MB gzip body that inflates to 2 GiB costs at most the cap in memory. Status lines, headers and
  chunk sizes are bounded by :mod:`http.client` (64 KiB a line, 100 headers).
* **Wall-clock deadlines.** A per-read timeout does not stop a server that trickles one byte every
  few seconds. A :class:`Deadline` is a total budget for one exchange (redirects, token fetch and
  body included); when it runs out, the sockets it watches are shut down, which wakes any thread
  blocked on them.
* **Redirects** followed here, a bounded number of times, with credentials for the first origin only.
* **Proxies** from the environment (``https_proxy``, ``http_proxy``, ``all_proxy``, ``no_proxy``), as
  curl and Docker read them: plain HTTP through the proxy, HTTPS tunnelled with ``CONNECT``.
* **Plain messages.** :func:`describe_failure` turns a failed exchange into one line such as
  ``cannot connect to registry 127.0.0.1:1: connection refused``.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import http.client
import os
import re
import select
import socket
import ssl
import threading
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any, NamedTuple
from urllib.parse import SplitResult, unquote, urlencode, urljoin, urlsplit

from supermachine import paths
from supermachine.errors import RegistryError

READ_CHUNK = 256 << 10
"""Bytes asked of the connection per read while streaming a body."""
SEND_BLOCK = 1 << 20
"""Bytes read from a file per send while uploading it."""
MAX_REDIRECTS = 5
"""Redirects followed per request (registries send one, to blob storage)."""

_current = threading.local()


class BodyTooLarge(Exception):
    """A response body grew past its cap (after decoding)."""


class InvalidURL(ValueError):
    """A URL this module cannot or will not request."""


class TooManyRedirects(Exception):
    """More than :data:`MAX_REDIRECTS` redirects for one request."""


class SettingError(Exception):
    """A proxy or certificates the environment or the host's configuration names cannot be used;
    the message is a plain sentence."""


class ProxyError(SettingError):
    """The proxy named by the environment cannot be used."""


class ConnectTimeout(TimeoutError):
    """No TCP connection within the connect timeout (a read timeout is a plain :class:`TimeoutError`)."""


class Deadline:
    """A wall-clock budget for one exchange with a server, enforced while streaming.

    Used as a context manager on the thread that makes the requests: every socket the requests of
    that thread open or reuse meanwhile is watched, and shut down when the budget runs out. The
    block then fails with a :class:`RegistryError` carrying ``message``.
    """

    def __init__(self, seconds: float, message: str) -> None:
        self.seconds = seconds
        self.message = message
        self.fired = False
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._done = False
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._outer: Deadline | None = None

    def watch(self, sock: socket.socket) -> None:
        # A duplicate descriptor of the connection: it stays valid when the original socket object
        # is wrapped for TLS (which detaches it) or closed, and is never reused for another socket.
        try:
            dup = socket.socket(sock.family, sock.type, sock.proto, fileno=os.dup(sock.fileno()))
        except OSError:
            return  # already closed
        with self._lock:
            if not self._done:
                self._sockets.append(dup)
                if self.fired:
                    _shutdown(dup)
                return
        dup.close()

    def check(self) -> None:
        """Raise the deadline's error if the budget is spent."""
        if self.fired:
            raise RegistryError(self.message)

    def _expire(self) -> None:
        with self._lock:
            if self._done:
                return
            self.fired = True
            for sock in self._sockets:
                _shutdown(sock)

    def __enter__(self) -> Deadline:
        self._outer = getattr(_current, "deadline", None)
        _current.deadline = self
        self._timer.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        with self._lock:
            self._done = True
            for sock in self._sockets:
                sock.close()
            self._sockets.clear()
        self._timer.cancel()
        _current.deadline = self._outer
        if self.fired and (exc is None or isinstance(exc, Exception)):
            # Whatever broke (a short read, a reset, a half-parsed body) broke because we cut it off.
            raise RegistryError(self.message) from None


def _shutdown(sock: socket.socket) -> None:
    """Wake every thread blocked on the connection ``sock`` duplicates (they read end-of-file)."""
    with contextlib.suppress(OSError):  # the peer may have closed it already
        sock.shutdown(socket.SHUT_RDWR)


def _watch(sock: socket.socket | None) -> None:
    deadline: Deadline | None = getattr(_current, "deadline", None)
    if deadline is not None and sock is not None:
        deadline.watch(sock)


# ---- URLs ------------------------------------------------------------------------------------------
class Origin(NamedTuple):
    """Where a URL's requests go: scheme, host (lower case, IPv6 without brackets) and port."""

    scheme: str
    host: str
    port: int

    @property
    def netloc(self) -> str:
        """``host:port`` as a URL writes it (brackets around an IPv6 address, no default port)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if _DEFAULT_PORTS.get(self.scheme) == self.port else f"{host}:{self.port}"


_DEFAULT_PORTS = {"http": 80, "https": 443}
_HOST = re.compile(r"[a-z0-9._-]{1,253}|[0-9a-f:.]{2,45}")


def _split(url: str) -> tuple[Origin, SplitResult]:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise InvalidURL(f"malformed URL {plain(url, 80)!r}") from None
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if scheme not in _DEFAULT_PORTS:
        raise InvalidURL(f"URL {plain(url, 80)!r} is not http or https")
    if not _HOST.fullmatch(host) or "\\" in parts.netloc:
        # A backslash ends the host for some URL parsers and not for others: never guess.
        raise InvalidURL(f"URL {plain(url, 80)!r} has no valid host")
    if port == 0:
        raise InvalidURL(f"URL {plain(url, 80)!r} names port 0")
    return Origin(scheme, host, port or _DEFAULT_PORTS[scheme]), parts


def origin_of(url: str) -> Origin:
    """The :class:`Origin` of ``url``, parsed exactly as a request to it would be; raises
    :class:`InvalidURL` for anything but an http(s) URL with a plain host name or address."""
    return _split(url)[0]


def same_origin(a: str, b: str) -> bool:
    """True if URLs ``a`` and ``b`` have the same scheme, host and port."""
    return origin_of(a) == origin_of(b)


def _target(parts: SplitResult) -> str:
    """The request target (path and query) of a split URL."""
    path = parts.path or "/"
    return f"{path}?{parts.query}" if parts.query else path


# ---- proxies ---------------------------------------------------------------------------------------
class Proxy(NamedTuple):
    origin: Origin
    authorization: str | None
    """The ``Proxy-Authorization`` value for credentials in the proxy URL."""


def _basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


def proxy_for(origin: Origin, environ: Mapping[str, str] = os.environ) -> Proxy | None:
    """The proxy the environment names for requests to ``origin``, or None for a direct connection.

    As curl reads them: ``https_proxy`` (or ``HTTPS_PROXY``), ``http_proxy`` (lower case only: a
    CGI-style server sets ``HTTP_PROXY`` from a request header), ``all_proxy`` as a fallback, each an
    ``http://`` proxy; ``no_proxy`` lists hosts, domains (``.example.com`` or ``example.com``),
    addresses and ``*`` that are reached directly. Loopback hosts are always reached directly.
    """
    if not any(key.lower().endswith("_proxy") for key in environ):
        return None  # the common case

    def lookup(name: str) -> str:
        value = environ.get(name) or ("" if name == "http_proxy" else environ.get(name.upper(), ""))
        return value.strip()

    from supermachine.oci.reference import is_loopback_host

    url = lookup(f"{origin.scheme}_proxy") or lookup("all_proxy")
    if not url or is_loopback_host(origin.host) or _bypassed(origin.host, lookup("no_proxy")):
        return None
    if "://" not in url:
        url = f"http://{url}"
    shown = plain(url, 80)
    if not url.lower().startswith("http://"):
        raise ProxyError(f"the proxy {shown!r} is not an http:// proxy (the only kind supported)")
    try:
        proxy, parts = _split(url)
    except InvalidURL:
        raise ProxyError(f"the {origin.scheme}_proxy setting {shown!r} is not a valid proxy URL") from None
    credentials = None
    if parts.username is not None:
        credentials = _basic(unquote(parts.username), unquote(parts.password or ""))
    return Proxy(proxy, credentials)


def _bypassed(host: str, no_proxy: str) -> bool:
    """Whether ``no_proxy`` (comma-separated ``*``, host or domain names, addresses and CIDR
    networks; ports ignored) lists ``host``."""
    import ipaddress

    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for entry in (e.strip().lower() for e in no_proxy.split(",")):
        if entry.startswith("[") and "]" in entry:
            entry = entry[1 : entry.index("]")]  # [::1]:443
        elif entry.count(":") == 1:
            entry = entry.split(":")[0]  # host:port
        entry = entry.lstrip(".")
        if entry == "*":
            return True
        if not entry:
            continue
        if address is not None:
            with contextlib.suppress(ValueError):
                if address in ipaddress.ip_network(entry, strict=False):
                    return True
        elif host == entry or host.endswith("." + entry):
            return True
    return False


# ---- TLS ---------------------------------------------------------------------------------------------
def certs_dirs() -> tuple[Path, ...]:
    """Where per-registry certificates are looked for, as Podman and Docker look for them: the
    user's ``containers/certs.d`` (under ``$XDG_CONFIG_HOME``, else ``~/.config``), then
    ``/etc/containers/certs.d`` and ``/etc/docker/certs.d``."""
    user = paths.xdg_config_home() / "containers" / "certs.d"
    return (user, Path("/etc/containers/certs.d"), Path("/etc/docker/certs.d"))


def registry_certs(origin: Origin) -> tuple[Path, ...]:
    """The ``certs.d/HOST[:PORT]`` directories (see :func:`certs_dirs`) that exist for ``origin``."""
    name = origin.netloc
    if name.startswith(".") or "/" in name:
        return ()  # never a path outside the directories (host names cannot look like this)
    return tuple(base / name for base in certs_dirs() if (base / name).is_dir())


def tls_context(directories: tuple[Path, ...] = ()) -> ssl.SSLContext:
    """TLS settings: the system's trust store (``SSL_CERT_FILE`` or ``SSL_CERT_DIR`` name another),
    plus what ``directories`` (from :func:`registry_certs`) hold: ``*.crt`` CA certificates,
    trusted in addition, and ``NAME.cert`` with ``NAME.key`` client certificates, as Docker reads
    them."""
    context = ssl.create_default_context()
    for directory in directories:
        try:
            with os.scandir(directory) as listing:
                entries = sorted((e for e in listing if e.is_file()), key=lambda e: e.name)
            for entry in entries:
                if entry.name.endswith(".crt"):
                    context.load_verify_locations(cafile=entry.path)
                elif entry.name.endswith(".cert"):
                    key = entry.path[: -len(".cert")] + ".key"
                    if not os.path.isfile(key):
                        raise SettingError(f"client certificate {entry.path} has no key {key}")
                    context.load_cert_chain(entry.path, key)
        except (OSError, ssl.SSLError) as exc:
            raise SettingError(f"cannot use the certificates in {directory}: {_tls_reason_of(exc)}") from None
    return context


def _tls_reason_of(exc: OSError | ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLError):
        return _tls_reason(exc)
    return os.strerror(exc.errno).lower() if exc.errno else "unreadable"


# ---- connections -----------------------------------------------------------------------------------
class _Watched:
    """Opens the TCP connection of an :mod:`http.client` connection: reported to the current
    :class:`Deadline`, connect and read timed out separately."""

    connect_timeout: float
    read_timeout: float

    def _watch_connections(self, timeout: tuple[float, float]) -> None:
        self.connect_timeout, self.read_timeout = timeout
        # http.client opens its TCP connection through this attribute (set by its constructor).
        self._create_connection = self._open_socket

    def _open_socket(self, address: tuple[str, int], timeout: Any, source: Any = None) -> socket.socket:
        try:
            sock = socket.create_connection(address, self.connect_timeout, source)
        except TimeoutError:
            raise ConnectTimeout(f"no connection within {self.connect_timeout:g} s") from None
        _watch(sock)  # the raw socket: a stalled proxy tunnel or TLS handshake is cut off too
        sock.settimeout(self.read_timeout)
        return sock


class _HTTPConnection(_Watched, http.client.HTTPConnection):
    def __init__(self, host: str, port: int, timeout: tuple[float, float]) -> None:
        super().__init__(host, port, timeout=timeout[0], blocksize=SEND_BLOCK)
        self._watch_connections(timeout)


class _HTTPSConnection(_Watched, http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, timeout: tuple[float, float], context: ssl.SSLContext) -> None:
        super().__init__(host, port, timeout=timeout[0], context=context, blocksize=SEND_BLOCK)
        self._watch_connections(timeout)


_PoolKey = tuple[Origin, Proxy | None]


def _is_idle(conn: http.client.HTTPConnection) -> bool:
    """Whether a kept-alive connection can take a request: nothing to read on it (a peer that closed
    it, or sent bytes nobody asked for, makes it readable)."""
    sock = conn.sock
    if sock is None:
        return False
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return not poller.poll(0)


class Response:
    """A response whose body is streamed; read it with :meth:`readinto` or :func:`read_capped`.

    Closing it returns the connection to its session's pool if the body was read to its end, and
    closes the connection otherwise.
    """

    def __init__(
        self,
        session: Session,
        key: _PoolKey,
        conn: http.client.HTTPConnection,
        raw: http.client.HTTPResponse,
        url: str,
    ) -> None:
        self.status_code = raw.status
        self.reason = raw.reason
        self.headers = raw.headers
        self.url = url
        self._session = session
        self._key = key
        self._conn: http.client.HTTPConnection | None = conn
        self._raw = raw

    def readinto(self, buffer: bytearray | memoryview) -> int:
        """Read body bytes as sent (no decoding) into ``buffer``; 0 at the end of the body."""
        return self._raw.readinto(buffer)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._raw.isclosed() and not self._raw.will_close:
            self._session._put_idle(self._key, conn)
        else:
            self._raw.close()
            conn.close()

    def __enter__(self) -> Response:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# Failures of a kept-alive connection that the server closed before our request reached it.
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


class Session:
    """Connections to registries and token servers, shared by threads; requests never retry or
    follow redirects on their own (see :func:`send`)."""

    def __init__(self, user_agent: str, pool_size: int) -> None:
        self.user_agent = user_agent
        self.pool_size = pool_size
        self._lock = threading.Lock()
        self._idle: dict[_PoolKey, list[http.client.HTTPConnection]] = {}
        self._tls: dict[tuple[Path, ...], ssl.SSLContext] = {}

    def _context(self, origin: Origin) -> ssl.SSLContext:
        # Loading the trust store takes tens of milliseconds: only for HTTPS, and once for all the
        # hosts that have no certificates of their own.
        directories = registry_certs(origin)
        with self._lock:
            context = self._tls.get(directories)
            if context is None:
                context = self._tls[directories] = tls_context(directories)
            return context

    def _connection(
        self, key: _PoolKey, timeout: tuple[float, float]
    ) -> tuple[http.client.HTTPConnection, bool]:
        """An idle connection for ``key`` (and True), or a new one (and False)."""
        with self._lock:
            idle = self._idle.get(key, [])
            while idle:
                kept = idle.pop()
                if _is_idle(kept):
                    return kept, True
                kept.close()
        origin, proxy = key
        host, port = (proxy.origin.host, proxy.origin.port) if proxy else (origin.host, origin.port)
        conn: http.client.HTTPConnection
        if origin.scheme == "https":
            conn = _HTTPSConnection(host, port, timeout, self._context(origin))
            if proxy is not None:
                headers = {"Proxy-Authorization": proxy.authorization} if proxy.authorization else None
                conn.set_tunnel(origin.host, origin.port, headers)
        else:
            conn = _HTTPConnection(host, port, timeout)
        return conn, False

    def _put_idle(self, key: _PoolKey, conn: http.client.HTTPConnection) -> None:
        """Keep ``conn`` for reuse: at most ``pool_size`` idle connections per origin, for the
        ``pool_size`` origins used last (a registry can redirect every blob to another host)."""
        closing = []
        with self._lock:
            idle = self._idle.pop(key, [])
            self._idle[key] = idle  # the most recently used origin goes last
            if len(idle) < self.pool_size:
                idle.append(conn)
            else:
                closing.append(conn)
            while len(self._idle) > self.pool_size:
                closing += self._idle.pop(next(iter(self._idle)))
        for stale in closing:
            stale.close()

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        timeout: tuple[float, float],
        body: bytes | IO[bytes] | None = None,
    ) -> Response:
        """Send one request and read the response's status and headers."""
        origin, parts = _split(url)
        proxy = proxy_for(origin)
        sent = {"User-Agent": self.user_agent, **headers}
        target = _target(parts)
        if proxy is not None and origin.scheme == "http":
            target = f"http://{origin.netloc}{target}"  # a plain-HTTP proxy is sent the whole URL
            if proxy.authorization:
                sent["Proxy-Authorization"] = proxy.authorization
        key = (origin, proxy)
        while True:
            conn, reused = self._connection(key, timeout)
            _watch(conn.sock)
            try:
                conn.request(method, target, body=body, headers=sent)
                raw = conn.getresponse()
            except _STALE:
                conn.close()
                if reused and not hasattr(body, "read"):
                    continue  # the server closed it between our check and the request: a new one
                raise
            except BaseException:
                conn.close()
                raise
            return Response(self, key, conn, raw, url)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()


def new_session(user_agent: str, pool_size: int) -> Session:
    """A session whose requests honour :class:`Deadline` and never retry or redirect on their own."""
    return Session(user_agent, pool_size)


_REDIRECTS = frozenset({301, 302, 303, 307, 308})


def send(
    session: Session,
    method: str,
    url: str,
    *,
    headers: dict[str, str],
    timeout: tuple[float, float],
    auth: tuple[str, str] | None = None,
    params: list[tuple[str, str]] | None = None,
    data: dict[str, str] | None = None,
    body: bytes | IO[bytes] | None = None,
) -> Response:
    """Make a streaming request, following up to :data:`MAX_REDIRECTS` redirects (their bodies are
    never read). ``params`` are added to the query, ``data`` is sent as a form, ``auth`` as HTTP Basic.

    Credentials (an ``Authorization`` header or ``auth``) go to the origin of ``url`` only: a redirect
    to any other scheme, host or port is followed without them.
    """
    origin = origin_of(url)
    if params:
        url = f"{url}{'&' if '?' in url else '?'}{urlencode(params)}"
    for _ in range(MAX_REDIRECTS + 1):
        here = origin_of(url)
        sent = dict(headers)
        if here != origin:
            sent = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        elif auth is not None:
            sent["Authorization"] = _basic(*auth)
        payload = body
        if data is not None:
            payload = urlencode(data).encode()
            sent["Content-Type"] = "application/x-www-form-urlencoded"
        resp = session.request(method, url, headers=sent, timeout=timeout, body=payload)
        location = resp.headers.get("Location")
        if resp.status_code not in _REDIRECTS or not location:
            return resp
        resp.close()  # the body of a redirect is never read
        target = urljoin(url, location)
        if urlsplit(target).scheme.lower() not in _DEFAULT_PORTS:
            raise RegistryError(f"{_host(url)} redirected to a non-HTTP URL")
        if body is not None:
            # An upload's body is a stream that was (partly) sent already: it cannot follow.
            raise RegistryError(f"{_host(url)} redirected an upload")
        if data is not None and resp.status_code in (307, 308) and origin_of(target) != origin:
            # The form would be posted again, and it carries a credential (a refresh token).
            raise RegistryError(f"{_host(url)} redirected a credential-bearing request to another host")
        if resp.status_code in (301, 302, 303) and method != "GET":
            method, data = "GET", None
        url = target  # the Location carries its own query
    raise TooManyRedirects(f"more than {MAX_REDIRECTS} redirects")


# ---- bounded bodies ------------------------------------------------------------------------------
def _decoder(resp: Response) -> Any:
    """A zlib decompressor for the body's Content-Encoding, or None for an unencoded body."""
    encoding = (resp.headers.get("Content-Encoding") or "").strip().lower()
    if encoding in ("", "identity"):
        return None
    if encoding in ("gzip", "x-gzip"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if encoding == "deflate":
        return zlib.decompressobj()
    raise RegistryError(f"{_host(resp.url)} sent a body with unsupported Content-Encoding {encoding[:40]!r}")


def raw_chunks(resp: Response, size: int = READ_CHUNK) -> Iterator[memoryview]:
    """The body exactly as sent (no decoding), in chunks of at most ``size`` bytes. Each chunk is a
    view of one buffer that the next chunk overwrites: use it before asking for the next."""
    view = memoryview(bytearray(size))
    while n := resp.readinto(view):
        yield view[:n]


def read_capped(resp: Response, limit: int) -> bytes:
    """The decoded body of ``resp``; raises :class:`BodyTooLarge` as soon as it exceeds ``limit``.

    Decoding is done here, a bounded amount at a time, so a compression bomb never expands past
    ``limit + 1`` bytes.
    """
    decoder = _decoder(resp)
    out = bytearray()
    try:
        for chunk in raw_chunks(resp, min(READ_CHUNK, limit + 1)):
            room = limit - len(out)
            # max_length caps the output; when it is not reached, all of ``chunk`` was consumed.
            data = chunk if decoder is None else decoder.decompress(chunk, room + 1)
            if len(data) > room:
                raise BodyTooLarge
            out += data
            if decoder is not None and decoder.eof:
                break
    except zlib.error:
        raise RegistryError(f"{_host(resp.url)} sent a corrupt compressed body") from None
    if decoder is not None and not decoder.eof:
        raise RegistryError(f"{_host(resp.url)} sent a truncated compressed body")
    return bytes(out)


def _host(url: str) -> str:
    try:
        return origin_of(url).netloc
    except InvalidURL:
        return plain(url, 80)


def plain(text: str, limit: int = 200) -> str:
    """Text a server sent, made safe for a one-line message: printable, whitespace collapsed, capped."""
    cleaned = " ".join("".join(c if c.isprintable() else " " for c in text[: limit * 4]).split())
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."


# ---- one-line failures -----------------------------------------------------------------------------
def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it was raised from or during."""
    found: list[BaseException] = []
    queue: list[BaseException | None] = [exc]
    while queue and len(found) < 32:
        item = queue.pop(0)
        if item is None or any(item is seen for seen in found):
            continue
        found.append(item)
        queue += [item.__cause__, item.__context__]
    return found


def _tls_reason(err: ssl.SSLError | ssl.CertificateError) -> str:
    if isinstance(err, ssl.SSLCertVerificationError) and err.verify_message:
        return f"certificate verify failed: {err.verify_message}"
    reason = getattr(err, "reason", None)
    if isinstance(reason, str) and reason:
        return reason.lower().replace("_", " ")
    return " ".join(str(err).split())[:200] or "handshake failed"


def describe_failure(
    exc: BaseException, server: str, connect_timeout: float, read_timeout: float
) -> tuple[str, bool]:
    """A one-line description of a failed exchange with ``server`` (e.g. ``registry host:5000``),
    and whether trying again can help."""
    causes = _causes(exc)

    def has(*types: type[BaseException]) -> BaseException | None:
        return next((c for c in causes if isinstance(c, types)), None)

    if has(TooManyRedirects):
        return f"too many redirects from {server}", False
    setting = has(SettingError)
    if setting is not None:
        return f"cannot connect to {server}: {setting}", False
    tls = has(ssl.SSLError, ssl.CertificateError)
    if tls is not None:
        assert isinstance(tls, (ssl.SSLError, ssl.CertificateError))
        return f"TLS error talking to {server}: {_tls_reason(tls)}", False
    resolve = has(socket.gaierror)
    if resolve is not None:
        again = isinstance(resolve, socket.gaierror) and resolve.errno == socket.EAI_AGAIN
        return f"cannot connect to {server}: its host name does not resolve", again
    if has(ConnectionRefusedError):
        return f"cannot connect to {server}: connection refused", True
    if has(ConnectTimeout):
        return f"cannot connect to {server}: no answer within {connect_timeout:g} s", True
    if has(TimeoutError):
        return f"{server} did not answer within {read_timeout:g} s", True
    if has(ConnectionResetError, BrokenPipeError):
        return f"{server} reset the connection", True
    if has(http.client.IncompleteRead):
        return f"{server} closed the connection in the middle of a response", True
    if has(http.client.CannotSendRequest, http.client.ResponseNotReady):
        return f"request to {server} failed ({exc.__class__.__name__})", False
    if has(InvalidURL, http.client.InvalidURL):
        return f"invalid URL for {server}", False
    if has(http.client.HTTPException):
        return f"{server} sent a malformed HTTP response", True
    os_error = has(OSError)
    code = os_error.errno if isinstance(os_error, OSError) else None
    if code is not None and code in errno.errorcode:
        return f"cannot connect to {server}: {os.strerror(code).lower()}", True
    if os_error is not None:
        return f"cannot connect to {server}", True
    if has(ValueError):
        return f"invalid request to {server}", False
    return f"request to {server} failed ({exc.__class__.__name__})", False


NETWORK_ERRORS: tuple[type[BaseException], ...] = (
    http.client.HTTPException,
    OSError,
    InvalidURL,
    TooManyRedirects,
    SettingError,
)
"""What a request or a body read can raise because of the network or the peer."""
