"""One answer at a time, decided by the session alone; one id per answer, from the wire to the session."""

from __future__ import annotations

from fake_runtime import FakeResponse


async def test_the_wire_response_id_is_the_sessions_response_id(serve) -> None:
    served = await serve()
    client = await served.connect()
    await client.recv()
    _, done = await client.ask("hi")
    (session,) = served.runtime.sessions
    assert session.asked[-1].response_id == done["response"]["id"]
    await client.close()


async def test_an_answer_the_session_refuses_fails_at_once_without_retrying(serve) -> None:
    served = await serve()
    client = await served.connect()
    await client.recv()
    (session,) = served.runtime.sessions
    session.active = FakeResponse(session, [], None, "resp_still_ending")  # the session is not done yet
    await client.send({"type": "response.create", "response": {}})
    events = await client.until("response.done", timeout=1.0)  # the old retry loop took ~10 s
    errors = [e["error"]["code"] for e in events if e["type"] == "error"]
    assert errors == ["conversation_already_has_active_response"]
    assert events[-1]["response"]["status"] == "failed" and session.asked == []
    session.active = None
    answer, done = await client.ask("now?")  # the connection stays usable
    assert done["response"]["status"] == "completed" and "you said: now?" in answer
    await client.close()
