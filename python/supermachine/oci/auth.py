"""Registry authentication: credentials from the Docker config, and the 401 challenge flow.

Registries answer an unauthenticated request with ``401`` and a ``WWW-Authenticate`` header:

* ``Basic realm="..."``: send the username and password with every request;
* ``Bearer realm="https://auth/token",service="...",scope="repository:foo:pull"``: fetch a token from
  the realm (with the credentials as HTTP basic auth, if any; anonymously otherwise) and send it as
  ``Authorization: Bearer <token>``. Tokens are cached per scope until they expire.

The realm is chosen by the registry, so it is checked first (:func:`check_realm`): credentials never
travel in clear text to a host other than the registry the user named, or this machine.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supermachine.errors import AuthenticationError, RegistryError
from supermachine.oci.reference import is_loopback_host
from supermachine.oci.transport import (
    NETWORK_ERRORS,
    BodyTooLarge,
    InvalidURL,
    Session,
    describe_failure,
    origin_of,
    plain,
    read_capped,
    send,
)

DOCKER_HUB_CONFIG_KEY = "https://index.docker.io/v1/"
_HUB_ALIASES = ("docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com")


@dataclass(frozen=True)
class Credentials:
    """A username and password (or an identity token: a refresh token for the token server)."""

    username: str
    password: str = ""
    identity_token: str | None = None

    def __repr__(self) -> str:  # never print secrets
        return f"Credentials(username={self.username!r}, password=***)"


@dataclass(frozen=True)
class Challenge:
    """One challenge from a ``WWW-Authenticate`` header: a scheme and its parameters."""

    scheme: str
    params: dict[str, str]


_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_CHALLENGE_PART = re.compile(
    rf"\s*(?:(?P<key>{_TOKEN})\s*=\s*(?:\"(?P<quoted>(?:[^\"\\]|\\.)*)\"|(?P<bare>[^\s,]*))"
    rf"|(?P<scheme>{_TOKEN})(?:\s+|$|(?=,)))\s*,?"
)


def parse_www_authenticate(header: str) -> list[Challenge]:
    """Parse a ``WWW-Authenticate`` value into its challenges (RFC 7235 syntax, tolerant)."""
    challenges: list[Challenge] = []
    pos = 0
    header = header.strip()
    while pos < len(header):
        m = _CHALLENGE_PART.match(header, pos)
        if not m or m.end() == pos:
            break
        pos = m.end()
        if m.group("scheme"):
            challenges.append(Challenge(m.group("scheme").lower(), {}))
        elif challenges:
            value = m.group("quoted")
            value = re.sub(r"\\(.)", r"\1", value) if value is not None else m.group("bare") or ""
            challenges[-1].params[m.group("key").lower()] = value
    return challenges


def docker_config_path() -> Path:
    """``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``."""
    base = os.environ.get("DOCKER_CONFIG")
    return Path(base) / "config.json" if base else Path.home() / ".docker" / "config.json"


def _config_keys(registry: str) -> list[str]:
    if registry in _HUB_ALIASES:
        return [DOCKER_HUB_CONFIG_KEY, *_HUB_ALIASES]
    return [registry]


def _normalise_key(key: str) -> str:
    key = re.sub(r"^[a-z]+://", "", key)
    return key.split("/", 1)[0]


def _from_helper(helper: str, server: str) -> Credentials | None:
    import subprocess  # rarely needed: not imported by every pull

    try:
        proc = subprocess.run(
            [f"docker-credential-{helper}", "get"],
            input=server.encode(),
            capture_output=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    try:
        data = json.loads(proc.stdout)
    except ValueError:
        return None
    user, secret = str(data.get("Username", "")), str(data.get("Secret", ""))
    if user == "<token>":
        return Credentials("", identity_token=secret)
    return Credentials(user, secret) if user or secret else None


def load_credentials(registry: str, config_path: Path | None = None) -> Credentials | None:
    """Credentials for ``registry`` (``host[:port]``) from the Docker config file, or ``None``.

    Honours ``auths`` (``auth`` = base64 ``user:pass``, or ``username``/``password``, or
    ``identitytoken``), ``credHelpers`` and ``credsStore`` (running ``docker-credential-<name> get``).
    """
    path = config_path or docker_config_path()
    try:
        config: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise AuthenticationError(f"cannot read Docker config {path}: {exc}") from None
    keys = _config_keys(registry)
    helpers = config.get("credHelpers") or {}
    for key in keys:
        if isinstance(helpers, dict) and key in helpers:
            return _from_helper(str(helpers[key]), key)
    auths = config.get("auths") or {}
    if isinstance(auths, dict):
        by_host = {_normalise_key(k): v for k, v in auths.items()}
        for key in keys:
            entry = auths.get(key) or by_host.get(_normalise_key(key))
            if isinstance(entry, dict):
                creds = _entry_credentials(entry, registry)
                if creds:
                    return creds
    store = config.get("credsStore")
    if isinstance(store, str) and store:
        return _from_helper(store, keys[0])
    return None


def _entry_credentials(entry: dict[str, Any], registry: str) -> Credentials | None:
    token = entry.get("identitytoken")
    if entry.get("auth"):
        try:
            user, _, password = base64.b64decode(str(entry["auth"])).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            raise AuthenticationError(f"malformed 'auth' entry for {registry} in the Docker config") from None
        return Credentials(user, password, str(token) if token else None)
    if entry.get("username") or token:
        return Credentials(
            str(entry.get("username", "")), str(entry.get("password", "")), str(token) if token else None
        )
    return None


MAX_TOKEN_RESPONSE_BYTES = 1 << 20
"""The most of a token server's answer that is read (tokens are a few kilobytes)."""
MAX_TOKEN_LIFETIME = 3600.0
"""Seconds a token is reused at most, whatever ``expires_in`` says."""
_BEARER_TOKEN = re.compile(r"[\x21-\x7e]{1,65536}")  # printable ASCII: safe in a header


def check_realm(realm: str, registry: str, plain_http_host: str | None) -> str:
    """Return ``realm`` if credentials and scopes may be sent there, else raise.

    A token realm must be HTTPS, or on a loopback host, or (when the user chose plain HTTP for the
    registry) on the registry's own host: otherwise a registry could have the Docker credentials sent
    in clear text to any host it names.
    """
    shown = plain(realm, 120)
    try:
        origin = origin_of(realm)  # parsed as the token request will parse it
    except InvalidURL:
        raise AuthenticationError(f"registry {registry} sent an invalid token realm {shown!r}") from None
    if origin.scheme == "https" or is_loopback_host(origin.host):
        return realm
    if plain_http_host is not None and origin.host == plain_http_host.strip("[]").lower():
        return realm
    raise AuthenticationError(
        f"registry {registry} named a token server on plain HTTP ({shown}); refusing to send credentials"
        " or token requests unencrypted to another host (a token realm must be HTTPS unless it is on"
        " this machine)"
    )


class Authenticator:
    """Answers registry challenges and remembers the resulting ``Authorization`` header per scope.

    ``plain_http_host`` is the registry's host name when the user chose to reach it over plain HTTP.
    Token requests run on the caller's thread, so a :class:`~supermachine.oci.transport.Deadline`
    active there bounds them too.
    """

    def __init__(
        self,
        session: Session,
        registry: str,
        credentials: Credentials | None,
        timeout: tuple[float, float] = (10.0, 60.0),
        *,
        plain_http_host: str | None = None,
    ) -> None:
        self.session = session
        self.registry = registry
        self.credentials = credentials
        self.timeout = timeout
        self.plain_http_host = plain_http_host
        self._lock = threading.Lock()
        self._headers: dict[str, tuple[str, float]] = {}  # scope -> (Authorization value, expiry)
        self._basic: str | None = None

    def header(self, scope: str) -> dict[str, str]:
        """The ``Authorization`` header to send for ``scope`` (empty until a challenge was answered)."""
        with self._lock:
            if self._basic:
                return {"Authorization": self._basic}
            cached = self._headers.get(scope)
            if cached and cached[1] > time.monotonic():
                return {"Authorization": cached[0]}
        return {}

    def answer(self, www_authenticate: str | None, scope: str, sent: dict[str, str]) -> None:
        """Handle a 401. Raises :class:`AuthenticationError` if retrying cannot help."""
        challenges = parse_www_authenticate(www_authenticate or "")
        if sent.get("Authorization"):
            # What we sent was refused: a fresh token may help once, reused credentials will not.
            with self._lock:
                if self._basic or not challenges:
                    raise self._rejected()
                self._headers.pop(scope, None)
        bearer = next((c for c in challenges if c.scheme == "bearer"), None)
        if bearer is not None:
            value = self._fetch_token(bearer, scope)
            with self._lock:
                self._headers[scope] = value
            return
        if any(c.scheme == "basic" for c in challenges):
            if not self.credentials:
                raise AuthenticationError(
                    f"registry {self.registry} requires a login; add credentials to {docker_config_path()}"
                )
            raw = f"{self.credentials.username}:{self.credentials.password}".encode()
            with self._lock:
                self._basic = "Basic " + base64.b64encode(raw).decode()
            return
        raise AuthenticationError(
            f"registry {self.registry} answered 401 without a usable challenge"
            f" ({plain(www_authenticate or '', 120) or 'none'})"
        )

    def _rejected(self) -> AuthenticationError:
        who = f"user {self.credentials.username!r}" if self.credentials else "anonymous access"
        return AuthenticationError(f"registry {self.registry} rejected {who} (401 Unauthorized)")

    def _fetch_token(self, challenge: Challenge, scope: str) -> tuple[str, float]:
        realm = challenge.params.get("realm")
        if not realm:
            raise AuthenticationError(f"registry {self.registry} sent a Bearer challenge without a realm")
        check_realm(realm, self.registry, self.plain_http_host)
        server = f"token server {plain(origin_of(realm).netloc, 80)}"
        scopes = [s for s in {challenge.params.get("scope") or "", scope} if s]
        params: list[tuple[str, str]] = [("scope", s) for s in sorted(scopes)]
        if challenge.params.get("service"):
            params.append(("service", challenge.params["service"]))
        creds = self.credentials
        try:
            if creds and creds.identity_token:
                form = dict(params)
                form.update(
                    grant_type="refresh_token", refresh_token=creds.identity_token, client_id="supermachine"
                )
                form["scope"] = " ".join(scopes)
                resp = send(self.session, "POST", realm, headers={}, data=form, timeout=self.timeout)
            else:
                if creds and creds.username:
                    params.append(("account", creds.username))
                auth = (creds.username, creds.password) if creds and creds.username else None
                resp = send(
                    self.session, "GET", realm, headers={}, params=params, auth=auth, timeout=self.timeout
                )
            with contextlib.closing(resp):
                if resp.status_code in (401, 403):
                    raise self._rejected()
                if resp.status_code != 200:
                    raise AuthenticationError(f"{server} answered HTTP {resp.status_code}")
                body = read_capped(resp, MAX_TOKEN_RESPONSE_BYTES)
        except BodyTooLarge:
            raise AuthenticationError(
                f"{server} sent an answer larger than {MAX_TOKEN_RESPONSE_BYTES} bytes"
            ) from None
        except NETWORK_ERRORS as exc:
            raise RegistryError(describe_failure(exc, server, *self.timeout)[0]) from None
        return self._token_from(body, server)

    def _token_from(self, body: bytes, server: str) -> tuple[str, float]:
        """The ``Authorization`` value and its expiry from a token server's JSON answer."""
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            raise AuthenticationError(f"{server} did not return JSON") from None
        token = data.get("token") or data.get("access_token") if isinstance(data, dict) else None
        if not isinstance(token, str) or not token:
            raise AuthenticationError(f"{server} returned no token")
        if not _BEARER_TOKEN.fullmatch(token):
            raise AuthenticationError(f"{server} returned a token with characters a header cannot carry")
        expires_in = data.get("expires_in")
        lifetime = 60.0
        if isinstance(expires_in, (int, float)) and not isinstance(expires_in, bool) and expires_in > 0:
            lifetime = float(min(expires_in, MAX_TOKEN_LIFETIME))  # also tames 1e400 and inf
        return f"Bearer {token}", time.monotonic() + max(lifetime - 10.0, 5.0)
