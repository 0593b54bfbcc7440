"""Which web pages may use the API: the ``Origin`` check and the CORS answers for allowed origins.

Any page a user visits could otherwise drive their local server (a WebSocket is never blocked by a
browser's same-origin policy). A request that carries ``Origin`` (every browser WebSocket, every
browser ``POST``, cross-origin ``fetch``) is allowed only from the server's own origin (same scheme,
host and port as the request's ``Host``) or an allow-listed one (``--allow-origin``; ``*`` allows
every origin); requests without ``Origin`` (SDKs, ``curl``) are not browser requests and pass.

Pure: the app passes the header values and the request's scheme.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

__all__ = ["ANY_ORIGIN", "Origin", "OriginPolicy", "Verdict", "cors_headers", "preflight_headers"]

ANY_ORIGIN = "*"
DEFAULT_PORTS = {"http": 80, "https": 443}
PREFLIGHT_MAX_AGE_S = 600
ALLOWED_METHODS = "GET, POST, DELETE, OPTIONS"
EXPOSED_HEADERS = "Location"  # a call's id for its DELETE
Verdict = Literal["no-origin", "same-origin", "allowed", "refused"]


@dataclass(frozen=True)
class Origin:
    """A web origin: scheme, lower-case host, port (the scheme's default when not written)."""

    scheme: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Origin:
        """``scheme://host[:port]`` (http or https, no path, query or user); ValueError otherwise."""
        parts = urlsplit(text.strip())
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PORTS:
            raise ValueError(f"not an http(s) origin: {text!r}")
        if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username is not None:
            raise ValueError(f"an origin is scheme://host[:port] only, got {text!r}")
        host = (parts.hostname or "").lower()
        if not host:
            raise ValueError(f"no host in the origin {text!r}")
        port = parts.port  # ValueError for a bad one
        return cls(scheme, host, DEFAULT_PORTS[scheme] if port is None else port)

    @classmethod
    def of_request(cls, scheme: str, host: str) -> Origin | None:
        """The origin a request was sent to, from its scheme and ``Host`` header; None if unreadable."""
        try:
            return cls.parse(f"{scheme}://{host}")
        except ValueError:
            return None

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = DEFAULT_PORTS[self.scheme] == self.port
        return f"{self.scheme}://{host}" if default else f"{self.scheme}://{host}:{self.port}"


@dataclass(frozen=True)
class OriginPolicy:
    """The allow-list; `check` decides one request."""

    allowed: frozenset[Origin] = frozenset()
    any: bool = False

    @classmethod
    def of(cls, origins: Iterable[str]) -> OriginPolicy:
        """From ``--allow-origin`` values (``*`` allows all); ValueError names a bad one."""
        allowed: set[Origin] = set()
        any_origin = False
        for text in origins:
            if text.strip() == ANY_ORIGIN:
                any_origin = True
            else:
                allowed.add(Origin.parse(text))
        return cls(frozenset(allowed), any_origin)

    def check(self, origin: str | None, scheme: str, host: str | None) -> Verdict:
        """The verdict on a request with this ``Origin`` header, sent over ``scheme`` to ``host``."""
        if origin is None:
            return "no-origin"
        try:
            theirs = Origin.parse(origin)
        except ValueError:  # "null" (file://, sandboxed frames) and garbage
            return "allowed" if self.any else "refused"
        if host is not None and theirs == Origin.of_request(scheme, host):
            return "same-origin"
        return "allowed" if self.any or theirs in self.allowed else "refused"

    def refusal(self, origin: str) -> str:
        """The message a refused request gets."""
        return (
            f"requests from the web origin {origin!r} are not allowed; "
            f"start the server with --allow-origin {origin} to allow them"
        )


def cors_headers(origin: str) -> dict[str, str]:
    """What an allowed cross-origin answer carries so the page may read it."""
    return {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Expose-Headers": EXPOSED_HEADERS,
        "Vary": "Origin",
    }


def preflight_headers(origin: str, request_headers: Mapping[str, str]) -> dict[str, str]:
    """The answer to an allowed origin's CORS preflight (``OPTIONS`` with
    ``Access-Control-Request-Method``): every method of the API and the headers it asked for."""
    asked = request_headers.get("Access-Control-Request-Headers", "").strip()
    return {
        **cors_headers(origin),
        "Access-Control-Allow-Methods": ALLOWED_METHODS,
        "Access-Control-Allow-Headers": asked or "Authorization, Content-Type",
        "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE_S),
        "Vary": "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
    }
