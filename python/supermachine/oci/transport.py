"""HTTP plumbing for talking to untrusted registries and token servers.

Three things ``requests`` does not do on its own:

* **Bounded bodies.** :func:`read_capped` reads a response body *after* decoding it and stops at a
  cap, so a 2 MB gzip body that inflates to 2 GiB costs at most the cap in memory.
* **Wall-clock deadlines.** A per-read timeout does not stop a server that trickles one byte every
  few seconds. A :class:`Deadline` is a total budget for one exchange (redirects, token fetch and
  body included); when it runs out, the sockets it watches are shut down, which wakes any thread
  blocked on them.
* **Plain messages.** :func:`describe_failure` turns the nested exceptions of ``requests``/``urllib3``
  into one line such as ``cannot connect to registry 127.0.0.1:1: connection refused``.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import os
import socket
import ssl
import threading
import zlib
from collections.abc import Iterator
from typing import IO, Any

import requests
import urllib3.exceptions
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from supermachine.errors import RegistryError

READ_CHUNK = 64 << 10
"""Bytes asked of the socket per read while streaming a body."""

_current = threading.local()


class BodyTooLarge(Exception):
    """A response body grew past its cap (after decoding)."""


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


class _WatchedHTTPConnection(HTTPConnection):
    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _watch(sock)
        return sock

    def request(self, *args: Any, **kwargs: Any) -> None:
        _watch(self.sock)  # a kept-alive connection reused by this request
        super().request(*args, **kwargs)


class _WatchedHTTPSConnection(HTTPSConnection):
    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _watch(sock)  # the raw socket: a stalled TLS handshake is cut off too
        return sock

    def request(self, *args: Any, **kwargs: Any) -> None:
        _watch(self.sock)
        super().request(*args, **kwargs)


class _WatchedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


_WATCHED_POOLS: dict[str, type[HTTPConnectionPool]] = {
    "http": _WatchedHTTPPool,
    "https": _WatchedHTTPSPool,
}


class WatchedAdapter(HTTPAdapter):
    """An :class:`HTTPAdapter` whose connections report their sockets to the current :class:`Deadline`."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _WATCHED_POOLS

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if not proxy.lower().startswith("socks"):  # SOCKS pools have their own connection classes
            manager.pool_classes_by_scheme = _WATCHED_POOLS
        return manager


class _Session(requests.Session):
    def get_redirect_target(self, resp: requests.Response) -> str | None:
        # Never a redirect as far as requests knows: it would read (and decode) the redirect's body
        # whole, even with allow_redirects=False, to prepare Response.next. :func:`send` follows them.
        return None


def new_session(user_agent: str, pool_size: int) -> requests.Session:
    """A session whose requests honour :class:`Deadline` and never retry or redirect on their own."""
    session = _Session()
    adapter = WatchedAdapter(pool_connections=pool_size, pool_maxsize=pool_size, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers["User-Agent"] = user_agent
    return session


MAX_REDIRECTS = 5
"""Redirects followed per request (registries send one, to blob storage)."""

_REDIRECTS = frozenset({301, 302, 303, 307, 308})


def _origin(url: str) -> tuple[str, str, int | None]:
    parsed = urllib3.util.parse_url(url)
    scheme = (parsed.scheme or "").lower()
    return (scheme, (parsed.host or "").lower(), parsed.port or {"http": 80, "https": 443}.get(scheme))


def same_origin(a: str, b: str) -> bool:
    """True if URLs ``a`` and ``b`` have the same scheme, host and port."""
    return _origin(a) == _origin(b)


def send(
    session: requests.Session,
    method: str,
    url: str,
    *,
    headers: dict[str, str],
    timeout: tuple[float, float],
    auth: tuple[str, str] | None = None,
    params: list[tuple[str, str]] | None = None,
    data: dict[str, str] | None = None,
    body: bytes | IO[bytes] | None = None,
) -> requests.Response:
    """Make a streaming request, following up to :data:`MAX_REDIRECTS` redirects here rather than in
    ``requests`` (which would read and decode each redirect body whole).

    Credentials (an ``Authorization`` header or ``auth``) go to the origin of ``url`` only: a redirect
    to any other scheme, host or port is followed without them.
    """
    origin = _origin(url)
    for _ in range(MAX_REDIRECTS + 1):
        same_origin = _origin(url) == origin
        sent = headers if same_origin else {k: v for k, v in headers.items() if k.lower() != "authorization"}
        resp = session.request(
            method,
            url,
            headers=sent,
            auth=auth if same_origin else None,
            params=params,
            data=data if body is None else body,
            stream=True,
            timeout=timeout,
            allow_redirects=False,
        )
        location = resp.headers.get("Location")
        if resp.status_code not in _REDIRECTS or not location:
            return resp
        resp.close()  # the body of a redirect is never read
        target = requests.compat.urljoin(url, location)
        if _origin(target)[0] not in ("http", "https"):
            raise RegistryError(f"{_host(url)} redirected to a non-HTTP URL")
        if body is not None:
            # An upload's body is a stream that was (partly) sent already: it cannot follow.
            raise RegistryError(f"{_host(url)} redirected an upload")
        if data is not None and resp.status_code in (307, 308) and _origin(target) != origin:
            # The form would be posted again, and it carries a credential (a refresh token).
            raise RegistryError(f"{_host(url)} redirected a credential-bearing request to another host")
        if resp.status_code in (301, 302, 303) and method != "GET":
            method, data = "GET", None
        url, params = target, None  # the Location carries its own query
    raise requests.TooManyRedirects(f"more than {MAX_REDIRECTS} redirects")


# ---- bounded bodies ------------------------------------------------------------------------------
def _decoder(resp: requests.Response) -> Any:
    """A zlib decompressor for the body's Content-Encoding, or None for an unencoded body."""
    encoding = resp.headers.get("Content-Encoding", "").strip().lower()
    if encoding in ("", "identity"):
        return None
    if encoding in ("gzip", "x-gzip"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if encoding == "deflate":
        return zlib.decompressobj()
    raise RegistryError(f"{_host(resp.url)} sent a body with unsupported Content-Encoding {encoding[:40]!r}")


def raw_chunks(resp: requests.Response) -> Iterator[bytes]:
    """The body exactly as sent (no decoding), in chunks of at most :data:`READ_CHUNK` bytes."""
    yield from resp.raw.stream(READ_CHUNK, decode_content=False)


def read_capped(resp: requests.Response, limit: int) -> bytes:
    """The decoded body of ``resp``; raises :class:`BodyTooLarge` as soon as it exceeds ``limit``.

    Decoding is done here, a bounded amount at a time, rather than by urllib3, so a compression bomb
    never expands past ``limit + 1`` bytes.
    """
    decoder = _decoder(resp)
    out = bytearray()
    try:
        for chunk in raw_chunks(resp):
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
    return urllib3.util.parse_url(url).netloc or url[:80]


def plain(text: str, limit: int = 200) -> str:
    """Text a server sent, made safe for a one-line message: printable, whitespace collapsed, capped."""
    cleaned = " ".join("".join(c if c.isprintable() else " " for c in text[: limit * 4]).split())
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."


# ---- one-line failures -----------------------------------------------------------------------------
def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and everything it wraps (urllib3 nests reasons in attributes and args)."""
    found: list[BaseException] = []
    queue: list[BaseException | None] = [exc]
    while queue and len(found) < 32:
        item = queue.pop(0)
        if item is None or any(item is seen for seen in found):
            continue
        found.append(item)
        reason = getattr(item, "reason", None)
        queue += [reason if isinstance(reason, BaseException) else None, item.__cause__, item.__context__]
        queue += [a for a in item.args if isinstance(a, BaseException)]
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

    if has(requests.TooManyRedirects):
        return f"too many redirects from {server}", False
    tls = has(ssl.SSLError, ssl.CertificateError)
    if tls is not None:
        assert isinstance(tls, (ssl.SSLError, ssl.CertificateError))
        return f"TLS error talking to {server}: {_tls_reason(tls)}", False
    resolve = has(urllib3.exceptions.NameResolutionError, socket.gaierror)
    if resolve is not None:
        again = any(isinstance(c, socket.gaierror) and c.errno == socket.EAI_AGAIN for c in causes)
        return f"cannot connect to {server}: its host name does not resolve", again
    if has(ConnectionRefusedError):
        return f"cannot connect to {server}: connection refused", True
    connect_timeout_error = any(
        isinstance(c, urllib3.exceptions.ConnectTimeoutError)
        and not isinstance(c, urllib3.exceptions.NewConnectionError)
        for c in causes
    )
    if connect_timeout_error or has(requests.ConnectTimeout):
        return f"cannot connect to {server}: no answer within {connect_timeout:g} s", True
    if has(requests.ReadTimeout, urllib3.exceptions.ReadTimeoutError, TimeoutError):
        return f"{server} did not answer within {read_timeout:g} s", True
    if has(ConnectionResetError, BrokenPipeError):
        return f"{server} reset the connection", True
    if has(
        http.client.RemoteDisconnected,
        http.client.IncompleteRead,
        urllib3.exceptions.ProtocolError,
        requests.exceptions.ChunkedEncodingError,
    ):
        return f"{server} closed the connection in the middle of a response", True
    os_error = has(urllib3.exceptions.NewConnectionError, OSError)
    code = os_error.errno if isinstance(os_error, OSError) else None
    if code is not None and code in errno.errorcode:
        return f"cannot connect to {server}: {os.strerror(code).lower()}", True
    if os_error is not None:
        return f"cannot connect to {server}", True
    if has(requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema, ValueError):
        return f"invalid URL for {server}", False
    if has(requests.exceptions.InvalidHeader, http.client.HTTPException, urllib3.exceptions.HTTPError):
        return f"{server} sent a malformed HTTP response", True
    return f"request to {server} failed ({exc.__class__.__name__})", False


NETWORK_ERRORS: tuple[type[BaseException], ...] = (
    requests.RequestException,
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    OSError,
)
"""What a request or a body read can raise because of the network or the peer."""
