"""The sans-I/O resume core: the replay log's numbering, bounds and gaps; tokens and grace periods."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.server.resume import Claimed, Refused, ReplayGap, ReplayLog, ResumeRegistry, new_token


def filled(n: int, **bounds: int) -> ReplayLog:
    log = ReplayLog(**bounds)
    for i in range(1, n + 1):
        assert log.append(f"e{i}", f"event {i}".encode()) == i
    return log


# -- ReplayLog ---------------------------------------------------------------------------------------


def test_events_are_numbered_from_one_and_read_back_by_number() -> None:
    log = ReplayLog()
    assert (log.first_seq, log.last_seq, len(log)) == (1, 0, 0)
    assert log.position(None) == 0 and log.data(1) is None
    log = filled(3)
    assert (log.first_seq, log.last_seq, len(log), log.bytes) == (1, 3, 3, 21)
    assert [log.data(i) for i in (0, 1, 2, 3, 4)] == [None, b"event 1", b"event 2", b"event 3", None]
    assert log.position("e2") == 2 and log.position("e3") == 3 and log.position(None) == 0
    assert log.bytes_after(0) == 21 and log.bytes_after(2) == 7 and log.bytes_after(3) == 0


def test_the_count_bound_drops_the_oldest_and_a_resume_from_them_is_a_gap() -> None:
    log = filled(5, max_events=3)
    assert (log.first_seq, log.last_seq, len(log), log.dropped) == (3, 5, 3, 2)
    assert log.data(2) is None and log.data(3) == b"event 3"
    # e2 itself is gone, so its number is unknown: even though #3.. are held, it is a gap
    assert isinstance(log.position("e2"), ReplayGap)
    assert log.position("e3") == 3
    gap = log.position("e1")
    assert isinstance(gap, ReplayGap) and gap.code == "replay_unavailable"
    assert "2 older ones were dropped" in gap.message and "3 events" in gap.message
    nothing = log.position(None)  # "I have nothing": #1 and #2 are gone
    assert isinstance(nothing, ReplayGap) and nothing.code == "replay_unavailable"


def test_the_byte_bound_drops_the_oldest_but_keeps_the_newest_alone() -> None:
    log = ReplayLog(max_bytes=10)
    log.append("a", b"12345")
    log.append("b", b"12345")
    assert len(log) == 2 and log.bytes == 10
    log.append("c", b"1")
    assert (log.first_seq, log.bytes, log.dropped) == (2, 6, 1)
    log.append("d", b"x" * 50)  # over the bound by itself: kept, everything older goes
    assert (log.first_seq, log.last_seq, log.bytes, log.dropped) == (4, 4, 50, 3)
    assert log.position("d") == 4 and isinstance(log.position("c"), ReplayGap)


def test_an_unknown_id_without_drops_is_invalid_not_a_gap() -> None:
    log = filled(3)
    unknown = log.position("nope")
    assert isinstance(unknown, ReplayGap) and unknown.code == "invalid_value"
    assert "nope" in unknown.message


def test_events_without_an_id_are_numbered_but_not_findable() -> None:
    log = ReplayLog()
    log.append("", b"x")
    log.append("b", b"y")
    assert log.last_seq == 2 and log.position("b") == 2
    blank = log.position("")
    assert isinstance(blank, ReplayGap) and blank.code == "invalid_value"


def test_a_reused_id_points_at_its_latest_event_and_survives_the_older_ones_eviction() -> None:
    log = ReplayLog(max_events=2)
    log.append("x", b"1")
    log.append("x", b"2")
    assert log.position("x") == 2
    log.append("y", b"3")  # evicts #1 (also "x"): the id still names #2
    assert log.position("x") == 2 and log.first_seq == 2


def test_bounds_must_be_positive() -> None:
    with pytest.raises(ValueError):
        ReplayLog(max_events=0)
    with pytest.raises(ValueError):
        ReplayLog(max_bytes=0)


def test_a_long_stream_keeps_memory_at_the_bound() -> None:
    log = ReplayLog(max_events=100_000, max_bytes=4096)
    for i in range(20_000):
        log.append(f"e{i}", b"0123456789abcdef")
    assert log.bytes <= 4096 and len(log) == 256 and log.dropped == 20_000 - 256
    assert len(log._seq_of) == 256  # the id index shrinks with the log


# -- ResumeRegistry -----------------------------------------------------------------------------------


def tokens() -> ResumeRegistry:
    counter = itertools.count(1)
    return ResumeRegistry(30.0, token_factory=lambda: f"tok{next(counter)}")


def test_new_tokens_are_random_and_url_safe() -> None:
    a, b = new_token(), new_token()
    assert a != b and a.startswith("rt_") and len(a) >= 32
    assert all(c.isalnum() or c in "-_" for c in a[3:])


def test_a_token_resumes_its_session_once_and_a_new_token_replaces_it() -> None:
    reg = tokens()
    assert reg.issue("s1") == "tok1"
    assert reg.lookup("tok1", 0.0) == "s1"  # attached: a takeover (half-open socket) is allowed
    reg.detach("s1", 10.0)
    assert reg.detached("s1")
    assert reg.lookup("tok1", 39.9) == "s1"
    claimed = reg.claim("s1", 39.9)
    assert claimed == Claimed("s1", "tok2") and not reg.detached("s1")
    used = reg.lookup("tok1", 40.0)
    assert isinstance(used, Refused) and used.code == "session_not_resumable"
    assert reg.lookup("tok2", 1000.0) == "s1"  # attached again: no deadline runs
    assert reg.next_deadline() is None and reg.due(1e9) == []


def test_the_grace_period_ends_at_its_deadline() -> None:
    reg = tokens()
    reg.issue("s1")
    reg.issue("s2")
    assert reg.detach("s1", 0.0) == 30.0
    assert reg.detach("s2", 5.0) == 35.0
    assert reg.next_deadline() == 30.0
    assert reg.due(29.999) == []
    late = reg.lookup("tok1", 30.0)
    assert isinstance(late, Refused) and "30 s grace period" in late.message
    assert isinstance(reg.claim("s1", 30.0), Refused)
    assert reg.due(40.0) == ["s1", "s2"]  # oldest deadline first, then forgotten
    assert len(reg) == 0 and reg.next_deadline() is None
    assert isinstance(reg.lookup("tok2", 0.0), Refused)


def test_a_resume_restarts_nothing_and_a_second_loss_gives_a_fresh_grace() -> None:
    reg = tokens()
    reg.issue("s1")
    reg.detach("s1", 0.0)
    reg.claim("s1", 20.0)
    reg.detach("s1", 25.0)
    assert reg.next_deadline() == 55.0 and reg.due(50.0) == []


def test_forget_and_unknown_sessions() -> None:
    reg = tokens()
    reg.issue("s1")
    with pytest.raises(ValueError):
        reg.issue("s1")
    assert reg.detach("nobody", 0.0) is None and not reg.detached("nobody")
    reg.forget("s1")
    reg.forget("s1")  # idempotent
    assert isinstance(reg.lookup("tok1", 0.0), Refused) and isinstance(reg.claim("s1", 0.0), Refused)
    assert isinstance(reg.lookup("", 0.0), Refused) and isinstance(reg.lookup("\udcff", 0.0), Refused)


def test_tokens_are_kept_only_as_digests() -> None:
    reg = tokens()
    reg.issue("s1")
    assert "tok1" not in repr(reg.__dict__) and all(isinstance(k, bytes) for k in reg._by_digest)


def test_a_negative_grace_is_refused() -> None:
    with pytest.raises(ValueError):
        ResumeRegistry(-1.0)


# -- the wire: session.created's resume block and session.resumed --------------------------------------


def test_the_protocol_core_puts_the_token_in_session_created_and_session_resumed_only() -> None:
    import json

    from runtime.server.protocol import RealtimeProtocol
    from runtime.wire import ResumeInfo, SessionCreated, SessionResumed, decode_server_event

    proto = RealtimeProtocol("sess_1", model="m", positions="group-decoupled")
    (created,) = proto.start(ResumeInfo("rt_a", 30.0))
    payload = created.encode()
    assert payload["session"]["resume"] == {"token": "rt_a", "grace_s": 30.0}
    decoded = decode_server_event(json.loads(created.to_json()))
    assert isinstance(decoded, SessionCreated) and decoded.session.resume == ResumeInfo("rt_a", 30.0)
    updated = [o for o in proto.receive('{"type": "session.update", "session": {}}') if hasattr(o, "session")]
    assert "resume" not in updated[-1].encode()["session"]

    resumed = proto.resumed(ResumeInfo("rt_b", 30.0), 7, "event_x")
    wire = json.loads(resumed.to_json())
    assert wire["type"] == "session.resumed" and wire["replayed"] == 7 and wire["last_event_id"] == "event_x"
    back = decode_server_event(wire)
    assert isinstance(back, SessionResumed) and back.replayed == 7 and back.last_event_id == "event_x"
    assert back.session.resume == ResumeInfo("rt_b", 30.0) and back.session.id == "sess_1"
    # a resume block without a token is no resume block
    assert ResumeInfo.decode({"grace_s": 3}) is None and ResumeInfo.decode(None) is None


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=80),
    max_events=st.integers(min_value=1, max_value=30),
    max_bytes=st.integers(min_value=1, max_value=400),
    probe=st.integers(min_value=0, max_value=90),
)
def test_a_replay_from_any_event_is_the_exact_rest_or_a_gap(
    sizes: list[int], max_events: int, max_bytes: int, probe: int
) -> None:
    """Whatever the bounds: a client that has event ``probe`` gets exactly the events after it, in
    order, or a gap when they are not all held; the log never holds more than its bounds (but one)."""
    log = ReplayLog(max_events=max_events, max_bytes=max_bytes)
    sent = [bytes([i % 251]) * size for i, size in enumerate(sizes)]
    for i, data in enumerate(sent, 1):
        log.append(f"e{i}", data)
        assert len(log) <= max_events and (log.bytes <= max_bytes or len(log) == 1)
    position = log.position(f"e{probe}" if probe else None)
    if isinstance(position, ReplayGap):
        held = probe + 1 >= log.first_seq and (probe == 0 or probe >= log.first_seq)
        assert not held or probe > len(sent)
    else:
        assert position == probe
        assert [log.data(seq) for seq in range(position + 1, log.last_seq + 1)] == sent[probe:]
