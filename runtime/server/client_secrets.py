"""Short-lived client secrets (``POST /v1/realtime/client_secrets``, OpenAI GA shape) and who may connect.

A browser should never hold the server's long-lived API key: a backend (or the page, with the key
typed into it and held in memory) mints a client secret ``ek_…`` with the key, and the browser opens
its WebSocket or WebRTC call with the secret instead. Unlike OpenAI's, a speakwatch secret is single
use: it authenticates one connection, and the session defaults given when it was minted apply to the
session that connection opens. Redeemed, expired or unknown secrets are refused (401).

Pure: no clock, no I/O. Every call that depends on time takes ``now`` (Unix seconds), so the tests
need no clock and the app passes its own (``ServerConfig.clock``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

from runtime.wire import JSON, ErrorEvent, JSONObject, SessionUpdated, WireError, is_int

from .protocol import Limits, RealtimeProtocol, SessionConfig

__all__ = [
    "DEFAULT_EXPIRY_S",
    "MAX_EXPIRY_S",
    "MIN_EXPIRY_S",
    "SECRET_PREFIX",
    "ClientSecret",
    "ClientSecretRequest",
    "ClientSecrets",
    "Granted",
    "Refused",
    "SecretRefused",
    "TooManySecrets",
    "authorize",
    "decode_request",
    "session_defaults",
]

MIN_EXPIRY_S = 10  # OpenAI's bounds and default for expires_after.seconds
MAX_EXPIRY_S = 7200
DEFAULT_EXPIRY_S = 600
SECRET_PREFIX = "ek_"  # what OpenAI's client secrets look like; tells a secret from an API key

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# The request
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientSecretRequest:
    """A checked ``POST /v1/realtime/client_secrets`` body: the lifetime and the session defaults as
    sent (checked against the server's limits by `session_defaults`)."""

    seconds: int = DEFAULT_EXPIRY_S
    session: JSONObject | None = None


def decode_request(payload: JSON) -> ClientSecretRequest:
    """The body ``{"expires_after": {"anchor": "created_at", "seconds": N}, "session": {...}}``, both
    optional; a bad field raises `WireError` ``invalid_value`` naming it."""
    if payload is None:
        return ClientSecretRequest()
    if not isinstance(payload, dict):
        raise WireError("invalid_value", "the body must be a JSON object")
    seconds = DEFAULT_EXPIRY_S
    expires = payload.get("expires_after")
    if expires is not None:
        if not isinstance(expires, dict):
            raise WireError("invalid_value", "expires_after must be an object", "expires_after")
        anchor = expires.get("anchor", "created_at")
        if anchor != "created_at":
            raise WireError(
                "invalid_value", 'expires_after.anchor must be "created_at"', "expires_after.anchor"
            )
        value = expires.get("seconds", DEFAULT_EXPIRY_S)
        if not is_int(value) or not MIN_EXPIRY_S <= value <= MAX_EXPIRY_S:
            raise WireError(
                "invalid_value",
                f"expires_after.seconds must be an integer from {MIN_EXPIRY_S} to {MAX_EXPIRY_S}",
                "expires_after.seconds",
            )
        seconds = value
    session = payload.get("session")
    if session is not None and not isinstance(session, dict):
        raise WireError("invalid_value", "session must be an object", "session")
    return ClientSecretRequest(seconds, session)


def session_defaults(
    session: JSONObject | None,
    *,
    model: str,
    positions: str,
    limits: Limits,
    defaults: SessionConfig,
) -> tuple[SessionConfig, JSONObject]:
    """The session configuration a secret carries and its wire shape (``session`` of the response).

    Checked by the protocol core exactly as a ``session.update`` on top of the server's ``defaults``
    would be, so a minted session can hold nothing a session could not be updated to; a bad field
    raises `WireError` with the same code, message and param. The wire shape's ``id`` is empty: the
    session's id comes in its ``session.created``.
    """
    probe = RealtimeProtocol("", model=model, positions=positions, limits=limits, defaults=defaults)
    probe.start()
    update = json.dumps({"type": "session.update", "session": session or {}})
    shape: JSONObject = {}
    for out in probe.receive(update):
        if isinstance(out, ErrorEvent):
            raise WireError(out.error.code, out.error.message, out.error.param)  # type: ignore[arg-type]
        if isinstance(out, SessionUpdated):
            shape = out.session.encode()
    return probe.config, shape


# ---------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientSecret(Generic[T]):
    """One minted secret: the value the client presents, when it expires, what it carries."""

    value: str
    expires_at: int  # Unix seconds; refused from this second on
    session: T


class TooManySecrets(Exception):
    """The store holds its limit of outstanding (unexpired, unused) secrets."""


class SecretRefused(Exception):
    """A presented secret that authenticates nothing; the message is the client's."""

    def __init__(self, reason: Literal["unknown", "expired", "used"], message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class _Entry(Generic[T]):
    expires_at: int
    session: T


def _digest(value: str) -> bytes:
    """Stored by hash only: the store never holds a usable secret, and lookups leak no prefix timing."""
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()


def _new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(24)  # 192 random bits


class ClientSecrets(Generic[T]):
    """Outstanding secrets, bounded: at most ``max_outstanding`` unused, unexpired ones (minting more
    raises `TooManySecrets`); expired ones are purged whenever one is minted. Redeemed secrets are
    remembered (as bounded as the outstanding ones, until they expire) only to say "already used"."""

    def __init__(self, max_outstanding: int = 1000, *, new_secret: Callable[[], str] = _new_secret) -> None:
        if max_outstanding < 1:
            raise ValueError("max_outstanding must be at least 1")
        self.max_outstanding = max_outstanding
        self._new_secret = new_secret
        self._outstanding: dict[bytes, _Entry[T]] = {}
        self._used: dict[bytes, int] = {}  # digest -> expires_at, oldest redemption first

    def __len__(self) -> int:
        """Outstanding secrets (expired ones count until purged)."""
        return len(self._outstanding)

    def mint(self, session: T, seconds: int, now: float) -> ClientSecret[T]:
        """A new secret for ``session``, valid ``seconds`` from ``now`` (whole seconds, like OpenAI's
        ``created_at + seconds``)."""
        if not MIN_EXPIRY_S <= seconds <= MAX_EXPIRY_S:
            raise ValueError(f"seconds must be from {MIN_EXPIRY_S} to {MAX_EXPIRY_S}")
        self.purge(now)
        if len(self._outstanding) >= self.max_outstanding:
            raise TooManySecrets(
                f"the server holds {self.max_outstanding} unused client secrets; "
                "use or let some expire before minting more"
            )
        value = self._new_secret()
        digest = _digest(value)
        if digest in self._outstanding or digest in self._used:
            raise RuntimeError("the secret factory repeated a value")
        expires_at = int(now) + seconds
        self._outstanding[digest] = _Entry(expires_at, session)
        return ClientSecret(value, expires_at, session)

    def redeem(self, value: str, now: float) -> T:
        """The session a secret carries; the secret is spent. Raises `SecretRefused` for a secret that
        is unknown, expired or already used."""
        digest = _digest(value)
        entry = self._outstanding.get(digest)
        if entry is None:
            if digest in self._used and now < self._used[digest]:
                raise SecretRefused("used", "this client secret was already used: mint one per connection")
            raise SecretRefused("unknown", "unknown or expired client secret")
        del self._outstanding[digest]
        if now >= entry.expires_at:
            raise SecretRefused("expired", "the client secret has expired")
        self._used[digest] = entry.expires_at
        while len(self._used) > self.max_outstanding:
            del self._used[next(iter(self._used))]
        return entry.session

    def purge(self, now: float) -> int:
        """Forget every expired secret; how many outstanding ones went."""
        expired = [d for d, entry in self._outstanding.items() if now >= entry.expires_at]
        for digest in expired:
            del self._outstanding[digest]
        for digest in [d for d, expires_at in self._used.items() if now >= expires_at]:
            del self._used[digest]
        return len(expired)


# ---------------------------------------------------------------------------------------------
# Who may connect
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Granted(Generic[T]):
    """Let the request through; ``session`` holds the defaults of a redeemed secret, else None."""

    session: T | None = None


@dataclass(frozen=True)
class Refused:
    """Answer 401 with this message (code ``invalid_api_key``)."""

    message: str


def authorize(
    presented: Sequence[str],
    *,
    api_key: str | None,
    store: ClientSecrets[T] | None,
    now: float,
) -> Granted[T] | Refused:
    """Decide one ``/v1/*`` request from the keys it presents (Bearer header, WebSocket subprotocol).

    The API key (when the server has one, compared in constant time) always passes. Where
    ``store`` is given (the endpoints that open a session) a presented ``ek_…`` secret is redeemed,
    also on a server without a key (so its session defaults apply), and refused if it is not good.
    """
    if api_key:
        wanted = api_key.encode()
        if any(hmac.compare_digest(key.encode(), wanted) for key in presented):
            return Granted()
    if store is not None:
        offered = next((key for key in presented if key.startswith(SECRET_PREFIX)), None)
        if offered is not None:
            try:
                return Granted(store.redeem(offered, now))
            except SecretRefused as exc:
                return Refused(str(exc))
    if api_key:
        hint = "Authorization: Bearer KEY, or a client secret where a session opens"
        return Refused(f"missing or incorrect API key ({hint})")
    return Granted()
