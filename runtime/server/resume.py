"""Sans-I/O core of session resumption: the replay log of one session and the registry of resume tokens.

A WebSocket session outlives its socket for a grace period. Every server event of the session is
numbered (1, 2, ...) and kept, encoded, in a bounded `ReplayLog`; a client that reconnects names the
last event it got (``last_event_id``) and is sent exactly the events after it, in order. If the log
has dropped some of them (its bound), the resume is refused with `ReplayGap`: silently skipping
events would leave the client with a wrong transcript.

`ResumeRegistry` maps resume tokens to sessions and keeps the grace deadlines. A token is used once:
each resume hands out a new one, so a token seen in a log cannot be replayed later. Tokens are kept
only as SHA-256 digests (a lookup reveals nothing through timing, a memory dump no token). No
sockets, tasks or clocks here: ``now`` comes in as an argument (seconds of a monotonic clock).
"""

from __future__ import annotations

import hashlib
import secrets
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "Claimed",
    "Refused",
    "ReplayGap",
    "ReplayLog",
    "ResumeRegistry",
    "new_token",
]


def new_token() -> str:
    """A resume token: 192 random bits, URL-safe (it travels in a query parameter)."""
    return "rt_" + secrets.token_urlsafe(24)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


# ---------------------------------------------------------------------------------------------
# The replay log
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplayGap:
    """What a resume cannot be given: ``code`` is the wire error code, ``message`` says why."""

    code: str
    message: str


class ReplayLog:
    """The last server events of one session, numbered from 1, bounded by count and by bytes.

    ``append`` numbers an event and drops the oldest ones beyond the bounds (``dropped`` counts them);
    ``position`` turns the client's ``last_event_id`` into the sequence number it has, or a `ReplayGap`.
    The newest event is always kept, even alone over ``max_bytes``.
    """

    def __init__(self, max_events: int = 10_000, max_bytes: int = 8 * 1024 * 1024) -> None:
        if max_events < 1 or max_bytes < 1:
            raise ValueError("a replay log needs room for at least one event and one byte")
        self.max_events = max_events
        self.max_bytes = max_bytes
        self._entries: deque[tuple[str, bytes]] = deque()  # (event_id, data); seq = first + index
        self._seq_of: dict[str, int] = {}
        self._first = 1  # seq of _entries[0]
        self.bytes = 0
        self.dropped = 0

    @property
    def first_seq(self) -> int:
        """The oldest sequence number still held (``last_seq + 1`` when empty)."""
        return self._first

    @property
    def last_seq(self) -> int:
        """The newest sequence number given (0 before any event)."""
        return self._first + len(self._entries) - 1

    def __len__(self) -> int:
        return len(self._entries)

    def append(self, event_id: str, data: bytes) -> int:
        """Log one event (its encoded bytes); its sequence number."""
        self._entries.append((event_id, data))
        self.bytes += len(data)
        seq = self.last_seq
        if event_id:
            self._seq_of[event_id] = seq
        while len(self._entries) > 1 and (
            len(self._entries) > self.max_events or self.bytes > self.max_bytes
        ):
            old_id, old = self._entries.popleft()
            self.bytes -= len(old)
            self._first += 1
            self.dropped += 1
            if self._seq_of.get(old_id) == self._first - 1:
                del self._seq_of[old_id]
        return seq

    def data(self, seq: int) -> bytes | None:
        """The encoded event ``seq``; None once dropped (or not given yet)."""
        index = seq - self._first
        if not 0 <= index < len(self._entries):
            return None
        return self._entries[index][1]

    def bytes_after(self, seq: int) -> int:
        """Bytes of the held events after ``seq`` (what a replay from there sends)."""
        start = max(0, seq + 1 - self._first)
        return sum(len(self._entries[i][1]) for i in range(start, len(self._entries)))

    def position(self, last_event_id: str | None) -> int | ReplayGap:
        """The sequence number of ``last_event_id`` (None: the client has nothing, 0); a `ReplayGap`
        when the events after it are no longer all held, or the id was never sent."""
        if last_event_id is None:
            seq = 0
        else:
            found = self._seq_of.get(last_event_id)
            if found is None:
                if self.dropped:
                    return ReplayGap(
                        "replay_unavailable",
                        f"event {last_event_id!r} is not among the {len(self)} latest events this session "
                        f"still holds ({self.dropped} older ones were dropped, the log keeps at most "
                        f"{self.max_events} events and {self.max_bytes} bytes): the events after it "
                        "cannot be replayed",
                    )
                return ReplayGap("invalid_value", f"no event {last_event_id!r} was sent on this session")
            seq = found
        if seq + 1 < self._first:
            return ReplayGap(
                "replay_unavailable",
                f"the events after #{seq} were dropped ({self.dropped} so far; the log keeps at most "
                f"{self.max_events} events and {self.max_bytes} bytes): they cannot be replayed",
            )
        return seq


# ---------------------------------------------------------------------------------------------
# Resume tokens and grace periods
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claimed:
    """A resume accepted: the session, and the new token that replaces the one used."""

    session_id: str
    token: str


@dataclass(frozen=True)
class Refused:
    """A resume refused; ``message`` is what the client is told."""

    code: str
    message: str


@dataclass
class _Entry:
    session_id: str
    digest: bytes
    deadline: float | None = None  # set while detached (no socket): the end of its grace period


class ResumeRegistry:
    """Which token resumes which session, and which sessions wait, detached, until when.

    ``issue`` when a session opens; ``detach(session, now)`` when its socket goes (the grace period
    starts); ``lookup(token, now)`` to check a reconnect, ``claim(session, now)`` to accept it (a
    fresh token, the old one dead); ``due(now)`` the sessions whose grace ended (forgotten here; the
    caller closes them); ``forget`` when a session closes for any other reason.
    """

    def __init__(self, grace: float, token_factory: Callable[[], str] = new_token) -> None:
        if grace < 0:
            raise ValueError("the grace period cannot be negative")
        self.grace = grace
        self._new_token = token_factory
        self._by_session: dict[str, _Entry] = {}
        self._by_digest: dict[bytes, _Entry] = {}

    def __len__(self) -> int:
        return len(self._by_session)

    def issue(self, session_id: str) -> str:
        """The first token of a newly opened (attached) session."""
        if session_id in self._by_session:
            raise ValueError(f"session {session_id!r} already has a token")
        token = self._new_token()
        entry = _Entry(session_id, _digest(token))
        self._by_session[session_id] = entry
        self._by_digest[entry.digest] = entry
        return token

    def detach(self, session_id: str, now: float) -> float | None:
        """The session lost its socket: its grace period ends at the returned deadline (None: unknown)."""
        entry = self._by_session.get(session_id)
        if entry is None:
            return None
        entry.deadline = now + self.grace
        return entry.deadline

    def detached(self, session_id: str) -> bool:
        entry = self._by_session.get(session_id)
        return entry is not None and entry.deadline is not None

    def lookup(self, token: str, now: float) -> str | Refused:
        """The session ``token`` resumes, without using the token up; or why it does not."""
        entry = self._by_digest.get(_digest(token))
        if entry is None or (entry.deadline is not None and now >= entry.deadline):
            return Refused(
                "session_not_resumable",
                "no session to resume with this token: it is unknown, was used already, or its "
                f"session ended (closed, or not resumed within the {self.grace:g} s grace period)",
            )
        return entry.session_id

    def claim(self, session_id: str, now: float) -> Claimed | Refused:
        """Accept the resume of a session `lookup` found: attached again, under a new token."""
        entry = self._by_session.get(session_id)
        if entry is None or (entry.deadline is not None and now >= entry.deadline):
            return Refused("session_not_resumable", f"session {session_id!r} can no longer be resumed")
        del self._by_digest[entry.digest]
        token = self._new_token()
        entry.digest = _digest(token)
        entry.deadline = None
        self._by_digest[entry.digest] = entry
        return Claimed(session_id, token)

    def due(self, now: float) -> list[str]:
        """Sessions whose grace period has ended, oldest deadline first; forgotten here."""
        ended = sorted(
            (e for e in self._by_session.values() if e.deadline is not None and now >= e.deadline),
            key=lambda e: e.deadline or 0.0,
        )
        for entry in ended:
            self.forget(entry.session_id)
        return [entry.session_id for entry in ended]

    def next_deadline(self) -> float | None:
        """The earliest grace deadline of a detached session (None: none is detached)."""
        deadlines = [e.deadline for e in self._by_session.values() if e.deadline is not None]
        return min(deadlines) if deadlines else None

    def forget(self, session_id: str) -> None:
        entry = self._by_session.pop(session_id, None)
        if entry is not None:
            self._by_digest.pop(entry.digest, None)
