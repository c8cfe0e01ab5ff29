"""A client for the Docker Registry HTTP API v2 / OCI distribution API (pull side only)."""

from __future__ import annotations

import contextlib
import hashlib
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import requests
import urllib3.exceptions
from requests.adapters import HTTPAdapter

from supermachine import __version__
from supermachine.errors import DigestMismatchError, RegistryError
from supermachine.oci.auth import Authenticator, Credentials, load_credentials
from supermachine.oci.manifest import ACCEPT_MANIFESTS, Descriptor
from supermachine.oci.reference import Reference
from supermachine.oci.store import BlobWriter

MAX_MANIFEST_BYTES = 4 << 20
CHUNK = 1 << 20


class _Retry(Exception):
    """A transient failure worth another attempt."""


_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_RETRYABLE: tuple[type[BaseException], ...] = (
    _Retry,
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    urllib3.exceptions.HTTPError,
    ConnectionError,
    TimeoutError,
)


class Cancelled(Exception):
    """Raised inside a download when another part of the same pull failed."""


def one_line(exc: BaseException) -> str:
    """An exception's message squeezed onto one line."""
    text = " ".join(str(exc).split())
    return text or exc.__class__.__name__


def _registry_message(resp: requests.Response) -> str:
    """The first ``errors[].message`` of a registry error body, if there is one."""
    try:
        data = resp.json()
        err = data["errors"][0]
        return f"{err.get('code', '')}: {err.get('message', '')}".strip(": ")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return resp.reason or ""


class RegistryClient:
    """Talks to one registry host. Thread-safe for concurrent blob downloads.

    ``insecure=None`` means plain HTTP for loopback hosts and HTTPS otherwise; ``True`` forces plain
    HTTP, ``False`` forces HTTPS. Credentials default to the Docker config file's.
    """

    def __init__(
        self,
        reference: Reference,
        *,
        insecure: bool | None = None,
        credentials: Credentials | None = None,
        retries: int = 5,
        backoff: float = 0.25,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        pool_size: int = 8,
    ) -> None:
        self.registry = reference.registry
        self.host = reference.api_host
        plain = reference.is_loopback if insecure is None else insecure
        self.base_url = f"{'http' if plain else 'https'}://{self.host}"
        self.retries = retries
        self.backoff = backoff
        self.timeout = (connect_timeout, read_timeout)
        self.session = requests.Session()
        adapter = HTTPAdapter(pool_connections=pool_size, pool_maxsize=pool_size, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers["User-Agent"] = f"supermachine/{__version__}"
        if credentials is None:
            credentials = load_credentials(self.registry)
        self.auth = Authenticator(
            self.session, self.registry, credentials, timeout=connect_timeout + read_timeout
        )

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- plumbing --------------------------------------------------------------------------------
    def _send(self, url: str, scope: str, headers: dict[str, str], *, stream: bool) -> requests.Response:
        """GET with authentication: answers up to two 401 challenges, then gives up."""
        for round_ in range(3):
            sent = {**headers, **self.auth.header(scope)}
            resp = self.session.get(url, headers=sent, stream=stream, timeout=self.timeout)
            if resp.status_code != 401 or round_ == 2:
                return resp
            challenge = resp.headers.get("WWW-Authenticate")
            resp.close()
            self.auth.answer(challenge, scope, sent)
        raise AssertionError("unreachable")

    def _sleep(self, attempt: int) -> None:
        delay = min(self.backoff * (2**attempt), 8.0)
        time.sleep(delay * (0.5 + random.random() / 2))

    def _retrying(self, what: str, fn: Callable[[], Any]) -> Any:
        attempt = 0
        while True:
            try:
                return fn()
            except _RETRYABLE as exc:
                attempt += 1
                if attempt > self.retries:
                    raise RegistryError(
                        f"{what} from {self.registry} failed after {attempt} attempts: {one_line(exc)}"
                    ) from None
                self._sleep(attempt - 1)

    # ---- manifests -------------------------------------------------------------------------------
    def get_manifest(self, repository: str, reference: str) -> tuple[bytes, str, str]:
        """Fetch a manifest or index by tag or digest: ``(raw bytes, media type, digest)``.

        The digest is computed from the bytes; if ``reference`` is a digest, it must match.
        """
        url = f"{self.base_url}/v2/{repository}/manifests/{reference}"
        scope = f"repository:{repository}:pull"
        where = f"{self.registry}/{repository}{'@' if reference.startswith('sha256:') else ':'}{reference}"

        def attempt() -> tuple[bytes, str]:
            resp = self._send(url, scope, {"Accept": ACCEPT_MANIFESTS}, stream=True)
            with contextlib.closing(resp):
                if resp.status_code in _RETRY_STATUS:
                    raise _Retry(f"HTTP {resp.status_code}")
                if resp.status_code == 404:
                    raise RegistryError(f"manifest for {where} not found ({_registry_message(resp)})")
                if resp.status_code != 200:
                    raise RegistryError(
                        f"registry {self.registry} answered HTTP {resp.status_code} for manifest {where}"
                        f" ({_registry_message(resp)})"
                    )
                raw = resp.raw.read(MAX_MANIFEST_BYTES + 1, decode_content=True)
                if len(raw) > MAX_MANIFEST_BYTES:
                    raise RegistryError(f"manifest for {where} is larger than {MAX_MANIFEST_BYTES} bytes")
                declared = resp.headers.get("Content-Length")
                if declared is not None and declared.isdigit() and int(declared) != len(raw):
                    raise _Retry(f"short manifest body ({len(raw)} of {declared} bytes)")
                return raw, resp.headers.get("Content-Type", "")

        raw, media_type = self._retrying(f"manifest {where}", attempt)
        digest = f"sha256:{hashlib.sha256(raw).hexdigest()}"
        if reference.startswith("sha256:") and digest != reference:
            raise DigestMismatchError(
                f"manifest {reference} from {self.registry}: content has digest {digest}"
            )
        return raw, media_type, digest

    # ---- blobs -----------------------------------------------------------------------------------
    def fetch_blob(
        self,
        repository: str,
        desc: Descriptor,
        writer: BlobWriter,
        *,
        on_progress: Callable[[int], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> None:
        """Download ``desc`` into ``writer``, resuming with HTTP Range after a dropped connection.

        Size overflow and digest mismatch raise :class:`DigestMismatchError` (the partial file is
        deleted by the writer); the caller commits the writer when this returns.
        """
        url = f"{self.base_url}/v2/{repository}/blobs/{desc.digest}"
        scope = f"repository:{repository}:pull"
        attempt = 0
        while writer.offset < desc.size or desc.size == 0:
            if cancel is not None and cancel.is_set():
                raise Cancelled
            start = writer.offset
            try:
                self._fetch_once(url, scope, desc, writer, on_progress, cancel)
                if writer.offset < desc.size:
                    raise _Retry(f"connection closed after {writer.offset} of {desc.size} bytes")
                return
            except _RETRYABLE as exc:
                if writer.offset > start:
                    attempt = 0  # progress was made: this is a flaky link, not a dead one
                attempt += 1
                if attempt > self.retries:
                    writer.close()
                    raise RegistryError(
                        f"blob {desc.digest} from {self.registry} failed after {attempt} attempts"
                        f" at byte {writer.offset}/{desc.size}: {one_line(exc)}"
                    ) from None
                self._sleep(attempt - 1)

    def _fetch_once(
        self,
        url: str,
        scope: str,
        desc: Descriptor,
        writer: BlobWriter,
        on_progress: Callable[[int], None] | None,
        cancel: threading.Event | None,
    ) -> None:
        headers = {"Accept-Encoding": "identity"}
        if writer.offset:
            headers["Range"] = f"bytes={writer.offset}-"
        resp = self._send(url, scope, headers, stream=True)
        with contextlib.closing(resp):
            if resp.status_code == 206:
                content_range = resp.headers.get("Content-Range", "")
                if not content_range.startswith(f"bytes {writer.offset}-"):
                    writer.restart()
                    raise _Retry(f"unexpected Content-Range {content_range!r}")
            elif resp.status_code == 200:
                if writer.offset:
                    writer.restart()  # the server ignored the Range header
            elif resp.status_code == 416:
                writer.restart()
                raise _Retry("range not satisfiable")
            elif resp.status_code in _RETRY_STATUS:
                raise _Retry(f"HTTP {resp.status_code}")
            elif resp.status_code == 404:
                raise RegistryError(
                    f"blob {desc.digest} not found in {self.registry} ({_registry_message(resp)})"
                )
            else:
                raise RegistryError(
                    f"registry {self.registry} answered HTTP {resp.status_code} for blob {desc.digest}"
                    f" ({_registry_message(resp)})"
                )
            if on_progress:
                on_progress(writer.offset)
            for chunk in resp.raw.stream(CHUNK, decode_content=False):
                writer.write(chunk)
                if on_progress:
                    on_progress(writer.offset)
                if cancel is not None and cancel.is_set():
                    raise Cancelled
