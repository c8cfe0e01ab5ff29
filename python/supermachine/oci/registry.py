"""A client for the Docker Registry HTTP API v2 / OCI distribution API (pull side only).

Registries are untrusted: every body is read with a cap (after decoding), every exchange has a
wall-clock deadline, redirects are followed a bounded number of times without credentials to other
hosts, and every failure is reported as one plain line.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import IO, Any, NoReturn
from urllib.parse import urljoin

from supermachine import __version__
from supermachine.errors import DigestMismatchError, RegistryError
from supermachine.oci.auth import Authenticator, Credentials, load_credentials
from supermachine.oci.manifest import ACCEPT_MANIFESTS, MAX_MANIFEST_BYTES, Descriptor
from supermachine.oci.reference import Reference
from supermachine.oci.store import BlobWriter
from supermachine.oci.transport import (
    NETWORK_ERRORS,
    BodyTooLarge,
    Deadline,
    Response,
    describe_failure,
    new_session,
    plain,
    raw_chunks,
    read_capped,
    same_origin,
    send,
)

REQUEST_DEADLINE = 60.0
"""Seconds one exchange (a manifest, with its redirects and token fetch) may take in all."""
MIN_BLOB_THROUGHPUT = 64 << 10
"""Bytes per second a blob download must average: a blob gets REQUEST_DEADLINE + size / this seconds,
retries included."""
MAX_ERROR_BODY_BYTES = 64 << 10
"""The most of an error response that is read for its message."""


class _Retry(Exception):
    """A transient failure worth another attempt; the message is a plain sentence."""


_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


class Cancelled(Exception):
    """Raised inside a download when another part of the same pull failed."""


def _registry_message(resp: Response) -> str:
    """The first ``errors[].message`` of a registry error body (read capped), else the HTTP reason."""
    reason = plain(resp.reason or "")
    unreadable = (
        BodyTooLarge,
        RegistryError,
        ValueError,
        LookupError,
        TypeError,
        AttributeError,
        RecursionError,
    )
    try:
        body = read_capped(resp, MAX_ERROR_BODY_BYTES)
        err = json.loads(body)["errors"][0]
        message = f"{err.get('code', '')}: {err.get('message', '')}".strip(": ")
    except unreadable + NETWORK_ERRORS:
        return reason
    return plain(message) or reason


class RegistryClient:
    """Talks to one registry host. Thread-safe for concurrent blob downloads.

    ``insecure=None`` means plain HTTP for loopback hosts and HTTPS otherwise; ``True`` forces plain
    HTTP, ``False`` forces HTTPS. Credentials default to the Docker config file's. ``deadline`` is the
    wall-clock budget of one manifest exchange; a blob gets ``deadline + size / min_throughput``
    seconds (see :data:`REQUEST_DEADLINE`, :data:`MIN_BLOB_THROUGHPUT`).
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
        deadline: float = REQUEST_DEADLINE,
        min_throughput: int = MIN_BLOB_THROUGHPUT,
        pool_size: int = 8,
    ) -> None:
        self.registry = reference.registry
        self.host = reference.api_host
        plain_http = reference.is_loopback if insecure is None else insecure
        self.base_url = f"{'http' if plain_http else 'https'}://{self.host}"
        self.retries = retries
        self.backoff = backoff
        self.timeout = (connect_timeout, read_timeout)
        self.deadline = deadline
        self.min_throughput = min_throughput
        self.session = new_session(f"supermachine/{__version__}", pool_size)
        if credentials is None:
            credentials = load_credentials(self.registry)
        self.auth = Authenticator(
            self.session,
            self.registry,
            credentials,
            timeout=self.timeout,
            plain_http_host=reference.hostname if plain_http else None,
        )

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- plumbing --------------------------------------------------------------------------------
    def _failed(self, exc: BaseException) -> NoReturn:
        """Re-raise a network failure as one plain line: :class:`_Retry` if trying again can help."""
        message, retryable = describe_failure(exc, f"registry {self.registry}", *self.timeout)
        if retryable:
            raise _Retry(message) from None
        raise RegistryError(message) from None

    def _send(
        self,
        url: str,
        scope: str,
        headers: dict[str, str],
        *,
        method: str = "GET",
        body: bytes | IO[bytes] | None = None,
    ) -> Response:
        """A request with authentication: answers up to two 401 challenges, then gives up. A file
        ``body`` is sent again from its start after a challenge."""
        for round_ in range(3):
            sent = {**headers, **self.auth.header(scope)}
            if body is not None and not isinstance(body, bytes):
                body.seek(0)
            try:
                resp = send(self.session, method, url, headers=sent, timeout=self.timeout, body=body)
            except NETWORK_ERRORS as exc:
                self._failed(exc)
            # Only the registry's own challenges are answered, not those of a host it redirected to.
            if resp.status_code != 401 or round_ == 2 or not same_origin(resp.url, self.base_url):
                return resp
            challenge = resp.headers.get("WWW-Authenticate")
            resp.close()
            self.auth.answer(challenge, scope, sent)
        raise AssertionError("unreachable")

    def _chunks(self, resp: Response) -> Iterator[memoryview]:
        """The raw body of ``resp`` (each chunk valid until the next), network failures turned into
        plain errors."""
        chunks = raw_chunks(resp)
        while True:
            try:
                chunk = next(chunks)
            except StopIteration:
                return
            except NETWORK_ERRORS as exc:
                self._failed(exc)
            yield chunk

    def _sleep(self, attempt: int) -> None:
        delay = min(self.backoff * (2**attempt), 8.0)
        time.sleep(delay * (0.5 + random.random() / 2))

    def _retrying(self, what: str, fn: Callable[[], Any]) -> Any:
        attempt = 0
        while True:
            try:
                return fn()
            except _Retry as exc:
                attempt += 1
                if attempt > self.retries:
                    raise RegistryError(f"{exc}; {what} failed after {attempt} attempts") from None
                self._sleep(attempt - 1)

    def _status_error(self, resp: Response, what: str) -> NoReturn:
        """Raise for a response that is not the content asked for."""
        if resp.status_code in _RETRY_STATUS:
            raise _Retry(f"registry {self.registry} answered HTTP {resp.status_code}")
        if resp.status_code == 404:
            raise RegistryError(f"{what} not found ({_registry_message(resp)})")
        status, detail = resp.status_code, _registry_message(resp)
        raise RegistryError(f"registry {self.registry} answered HTTP {status} for {what} ({detail})")

    # ---- manifests -------------------------------------------------------------------------------
    def get_manifest(self, repository: str, reference: str) -> tuple[bytes, str, str]:
        """Fetch a manifest or index by tag or digest: ``(raw bytes, media type, digest)``.

        The digest is computed from the bytes; if ``reference`` is a digest, it must match.
        """
        url = f"{self.base_url}/v2/{repository}/manifests/{reference}"
        scope = f"repository:{repository}:pull"
        where = f"{self.registry}/{repository}{'@' if reference.startswith('sha256:') else ':'}{reference}"
        late = f"registry {self.registry} did not deliver manifest {where} within {self.deadline:g} s"

        def attempt() -> tuple[bytes, str]:
            with Deadline(self.deadline, late):
                resp = self._send(url, scope, {"Accept": ACCEPT_MANIFESTS, "Accept-Encoding": "gzip"})
                with contextlib.closing(resp):
                    if resp.status_code != 200:
                        self._status_error(resp, f"manifest for {where}")
                    try:
                        raw = read_capped(resp, MAX_MANIFEST_BYTES)
                    except BodyTooLarge:
                        raise RegistryError(
                            f"manifest for {where} is larger than {MAX_MANIFEST_BYTES} bytes"
                        ) from None
                    except NETWORK_ERRORS as exc:
                        self._failed(exc)
                    return raw, plain(resp.headers.get("Content-Type", ""))

        raw, media_type = self._retrying(f"manifest {where}", attempt)
        digest = f"sha256:{hashlib.sha256(raw).hexdigest()}"
        if reference.startswith("sha256:") and digest != reference:
            raise DigestMismatchError(
                f"manifest {reference} from {self.registry}: content has digest {digest}"
            )
        return raw, media_type, digest

    # ---- blobs -----------------------------------------------------------------------------------
    # ---- uploads ---------------------------------------------------------------------------------
    def blob_exists(self, repository: str, desc: Descriptor) -> bool:
        """Whether the registry has ``desc`` in ``repository`` already (HEAD)."""
        url = f"{self.base_url}/v2/{repository}/blobs/{desc.digest}"
        scope = f"repository:{repository}:pull,push"

        late = (
            f"registry {self.registry} did not say whether it has blob {desc.digest}"
            f" within {self.deadline:g} s"
        )

        def attempt() -> bool:
            with (
                Deadline(self.deadline, late),
                contextlib.closing(self._send(url, scope, {}, method="HEAD")) as resp,
            ):
                if resp.status_code == 200:
                    return resp.headers.get("Content-Length") in (None, str(desc.size))
                if resp.status_code == 404:
                    return False
                self._status_error(resp, f"blob {desc.digest} in {self.registry}")

        return bool(self._retrying(f"checking blob {desc.digest}", attempt))

    def push_blob(self, repository: str, desc: Descriptor, opener: Callable[[], IO[bytes]]) -> bool:
        """Uploads the blob ``opener()`` reads (``desc`` says its digest and size) unless the
        registry has it; returns whether it was sent. One monolithic upload: POST for a session,
        then PUT with the digest; a failed attempt starts a new session."""
        if self.blob_exists(repository, desc):
            return False
        scope = f"repository:{repository}:pull,push"
        start = f"{self.base_url}/v2/{repository}/blobs/uploads/"

        def attempt() -> None:
            with contextlib.closing(self._send(start, scope, {"Content-Length": "0"}, method="POST")) as resp:
                if resp.status_code != 202 or not resp.headers.get("Location"):
                    self._status_error(resp, f"an upload session for {repository}")
                location = urljoin(start, resp.headers["Location"])
            separator = "&" if "?" in location else "?"
            url = f"{location}{separator}digest={desc.digest}"
            headers = {"Content-Type": "application/octet-stream", "Content-Length": str(desc.size)}
            with (
                opener() as blob,
                contextlib.closing(self._send(url, scope, headers, method="PUT", body=blob)) as put,
            ):
                if put.status_code not in (201, 204):
                    self._status_error(put, f"the upload of {desc.digest}")
                echoed = put.headers.get("Docker-Content-Digest")
                if echoed and echoed != desc.digest:
                    raise RegistryError(f"registry {self.registry} stored {desc.digest} as {echoed}")

        with Deadline(self.blob_deadline(desc.size), f"the upload of {desc.digest} took too long"):
            self._retrying(f"uploading blob {desc.digest}", attempt)
        return True

    def put_manifest(self, repository: str, tag: str, raw: bytes, media_type: str) -> str:
        """Uploads a manifest under ``tag``; returns its digest (checked against the registry's)."""
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        url = f"{self.base_url}/v2/{repository}/manifests/{tag}"
        scope = f"repository:{repository}:pull,push"

        late = f"registry {self.registry} did not take manifest {repository}:{tag} within {self.deadline:g} s"

        def attempt() -> None:
            headers = {"Content-Type": media_type}
            with (
                Deadline(self.deadline, late),
                contextlib.closing(self._send(url, scope, headers, method="PUT", body=raw)) as resp,
            ):
                if resp.status_code not in (201, 204):
                    self._status_error(resp, f"manifest {repository}:{tag}")
                echoed = resp.headers.get("Docker-Content-Digest")
                if echoed and echoed != digest:
                    raise RegistryError(
                        f"registry {self.registry} stored the manifest as {echoed}, not {digest}"
                    )

        self._retrying(f"uploading manifest {repository}:{tag}", attempt)
        return digest

    def blob_deadline(self, size: int) -> float:
        """Seconds a blob of ``size`` bytes may take to download, retries included."""
        return self.deadline + size / self.min_throughput

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
        budget = self.blob_deadline(desc.size)
        late = (
            f"blob {desc.digest} ({desc.size} bytes) from registry {self.registry}"
            f" did not arrive within {budget:.0f} s"
        )
        attempt = 0
        with Deadline(budget, late) as deadline:
            while writer.offset < desc.size or desc.size == 0:
                deadline.check()
                if cancel is not None and cancel.is_set():
                    raise Cancelled
                start = writer.offset
                try:
                    self._fetch_once(url, scope, desc, writer, on_progress, cancel)
                    if writer.offset < desc.size:
                        raise _Retry(
                            f"registry {self.registry} closed the connection after"
                            f" {writer.offset} of {desc.size} bytes"
                        )
                    return
                except _Retry as exc:
                    if writer.offset > start:
                        attempt = 0  # progress was made: this is a flaky link, not a dead one
                    attempt += 1
                    if attempt > self.retries:
                        writer.close()
                        raise RegistryError(
                            f"{exc}; blob {desc.digest} failed after {attempt} attempts"
                            f" at byte {writer.offset}/{desc.size}"
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
        resp = self._send(url, scope, headers)
        with contextlib.closing(resp):
            if resp.status_code == 206:
                content_range = resp.headers.get("Content-Range", "")
                if not content_range.startswith(f"bytes {writer.offset}-"):
                    writer.restart()
                    raise _Retry(f"registry {self.registry} sent an unexpected Content-Range")
            elif resp.status_code == 200:
                if writer.offset:
                    writer.restart()  # the server ignored the Range header
            elif resp.status_code == 416:
                writer.restart()
                raise _Retry(f"registry {self.registry} found the requested range not satisfiable")
            else:
                self._status_error(resp, f"blob {desc.digest} in {self.registry}")
            if on_progress:
                on_progress(writer.offset)
            # The writer refuses more than desc.size bytes, so an endless body stops there.
            for chunk in self._chunks(resp):
                writer.write(chunk)
                if on_progress:
                    on_progress(writer.offset)
                if cancel is not None and cancel.is_set():
                    raise Cancelled
