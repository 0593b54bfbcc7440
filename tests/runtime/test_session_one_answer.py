"""The session is the one authority on "one answer at a time", and an answer's id is the caller's.

The server relies on both: it passes its wire id into `Session.ask`, and it asks again as soon as the
previous answer's iterator has ended, with no retry (see `RealtimeConnection._start_response`).
"""

from __future__ import annotations

import asyncio

import pytest
from stub_runtime import stub_session

from runtime.errors import ResponseActive


async def test_the_response_carries_the_callers_id() -> None:
    async with stub_session() as session:
        assert session.ask("hi", max_tokens=2, response_id="resp_wire_1").id == "resp_wire_1"


async def test_a_second_answer_is_refused_until_the_first_has_ended() -> None:
    async with stub_session() as session:
        first = session.ask("hi", max_tokens=2)
        with pytest.raises(ResponseActive):
            session.ask("and?", max_tokens=2)
        await session.cancel()
        assert first.done and first.status in ("cancelled", "failed")


async def test_the_next_answer_is_accepted_as_soon_as_the_iterator_ends() -> None:
    async with stub_session() as session:
        for attempt in range(3):
            response = session.ask(f"question {attempt}", max_tokens=2, response_id=f"resp_{attempt}")
            async with asyncio.timeout(10):
                with pytest.raises(RuntimeError):  # the stub has no engine: the answer fails
                    async for _ in response:
                        pass
            assert response.status == "failed"
        cancelled = session.ask("one more", max_tokens=2)
        await session.cancel()
        assert cancelled.done
        session.ask("and the next", max_tokens=2)  # never ResponseActive once an answer has ended
