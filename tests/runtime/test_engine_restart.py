"""Engine death, seen and survived, without vLLM: the restart policy, the supervisor on fake engines
(a fake clock and sleep, so back-off is asserted exactly), and a real `Runtime` with real `Session`s
on scripted engines that can die (what the sessions lose, keep, count and refuse meanwhile).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import numpy as np
import pytest
from test_scheduler import CHAT, IM_END, SYSTEM, ScriptedEngine, StubEncoder, settle

from runtime import layout
from runtime.engine import engine_failure, engine_pids, exit_reason
from runtime.errors import EngineUnavailable, SessionLimitReached
from runtime.health import EngineSupervisor, RestartPolicy, retry_after
from runtime.memory import MemoryConfig
from runtime.request import StreamingRequest
from runtime.runtime import Runtime, RuntimeSettings
from streams.change import ChangeFilterSettings

pytestmark = pytest.mark.timeout(60)

PIXELS = np.zeros((8, 8, 3), np.uint8)


# -- the policy -------------------------------------------------------------------------------------


def test_back_off_doubles_up_to_its_cap_and_bad_settings_are_refused() -> None:
    assert RestartPolicy().delays() == (1.0, 2.0, 4.0)
    assert RestartPolicy(attempts=5, backoff_s=10.0, max_backoff_s=25.0).delays() == (10, 20, 25, 25, 25)
    assert RestartPolicy(attempts=0).delays() == ()
    for bad in ({"attempts": -1}, {"backoff_s": -0.5}, {"factor": 0.5}):
        with pytest.raises(ValueError):
            RestartPolicy(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="restart attempts"):
        RuntimeSettings(restart_attempts=-1)
    with pytest.raises(ValueError, match="engine_poll_s"):
        RuntimeSettings(engine_poll_s=0)
    assert (retry_after(10.0, 10.2), retry_after(10.0, 13.5), retry_after(10.0, 5.0)) == (1, 4, 1)


def test_exit_reason_names_the_signal() -> None:
    prefix = "the engine core process EngineCore (pid 42)"
    assert exit_reason("EngineCore", 42, -9) == f"{prefix} killed by SIGKILL"
    assert exit_reason("EngineCore", 42, 1) == f"{prefix} exited with code 1"


def test_the_probe_reads_the_engine_core_process_and_vllms_dead_flag() -> None:
    proc = SimpleNamespace(name="EngineCore", pid=7, exitcode=None)
    manager = SimpleNamespace(processes=[proc])
    engine = SimpleNamespace(engine_core=SimpleNamespace(resources=SimpleNamespace(engine_manager=manager)))
    engine.errored = False
    assert engine_failure(engine) is None and engine_pids(engine) == [7]  # type: ignore[arg-type]
    engine.errored = True  # vLLM saw it first (its monitor thread, or the output handler)
    assert "EngineDeadError" in (engine_failure(engine) or "")  # type: ignore[arg-type]
    proc.exitcode = -9
    assert engine_failure(engine) == "the engine core process EngineCore (pid 7) killed by SIGKILL"  # type: ignore[arg-type]
    assert engine_pids(SimpleNamespace()) == []  # type: ignore[arg-type]  # no processes vLLM manages


# -- the supervisor on fake engines ------------------------------------------------------------------


class FakeClock:
    """Monotonic time that only `sleep` advances; every sleep is recorded."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0.001)


class Engines:
    """Builds numbered fake engines (``fail`` lists the builds that raise); records what it stops."""

    def __init__(self, clock: FakeClock, fail: tuple[int, ...] = (), build_s: float = 5.0) -> None:
        self.clock, self.fail, self.build_s = clock, fail, build_s
        self.built: list[SimpleNamespace] = []
        self.stopped: list[int] = []
        self.calls = 0

    def build(self) -> SimpleNamespace:
        self.calls += 1
        self.clock.now += self.build_s  # a build takes time (the clock is only read on the loop)
        if self.calls in self.fail:
            raise RuntimeError(f"build {self.calls} failed")
        engine = SimpleNamespace(number=self.calls, dead=None)
        self.built.append(engine)
        return engine

    @staticmethod
    def probe(engine: SimpleNamespace) -> str | None:
        return engine.dead

    def stop(self, engine: SimpleNamespace) -> None:
        self.stopped.append(engine.number)


def supervise(engines: Engines, clock: FakeClock, policy: RestartPolicy, events: list) -> EngineSupervisor:
    """A supervisor on fake engines; ``events`` gets what it tells its owner (with the health it
    reports at the moment of a loss)."""
    made: list[EngineSupervisor] = []
    supervisor = EngineSupervisor(
        engines.build,
        engines.probe,
        engines.stop,
        policy,
        poll_s=0.25,
        on_lost=lambda reason: events.append(("lost", reason, made[0].health)),
        on_restored=lambda engine: events.append(("restored", engine.number)),
        on_failed=lambda reason: events.append(("failed", reason)),
        sleep=clock.sleep,
        clock=clock,
    )
    made.append(supervisor)
    return supervisor


async def test_a_death_is_seen_within_one_poll_and_the_engine_is_rebuilt() -> None:
    clock, events = FakeClock(), []
    engines = Engines(clock)
    supervisor = supervise(engines, clock, RestartPolicy(), events)
    first = await supervisor.start()
    assert supervisor.health.up and first.number == 1 and supervisor.build_s == 5.0
    await settle(lambda: len(clock.sleeps) >= 3)  # polling
    assert set(clock.sleeps) == {0.25} and events == []
    first.dead = "killed by SIGKILL"
    await settle(lambda: ("restored", 2) in events)
    kind, reason, health = events[0]
    assert (kind, reason) == ("lost", "killed by SIGKILL")
    # while restarting: 503 with a hint of back-off (1 s) plus the measured build (5 s)
    assert health.state == "restarting" and health.retry_after_s == 6 and health.failures == 1
    assert [s for s in clock.sleeps if s != 0.25] == [1.0], "rebuilt after the first back-off"
    assert engines.stopped == [1], "the dead engine is shut down"
    assert supervisor.engine is engines.built[1]
    health = supervisor.health
    assert (health.state, health.restarts, health.restart_attempts, health.failures) == ("up", 1, 1, 1)
    assert health.last_restart_s == pytest.approx(1.0 + 5.0), "death seen at a poll; back-off; build"
    assert health.retry_after_s is None and health.last_failure == "killed by SIGKILL"
    await supervisor.close()
    assert engines.stopped == [1, 2] and supervisor.health.state == "stopped"


async def test_failed_builds_back_off_exponentially_then_one_succeeds() -> None:
    clock, events = FakeClock(), []
    engines = Engines(clock, fail=(2, 3))
    supervisor = supervise(engines, clock, RestartPolicy(attempts=3, backoff_s=1.0), events)
    first = await supervisor.start()
    first.dead = "exited with code 1"
    await settle(lambda: ("restored", 4) in events)
    backoffs = [s for s in clock.sleeps if s != 0.25]
    assert backoffs == [1.0, 2.0, 4.0]
    health = supervisor.health
    assert (health.restart_attempts, health.restarts, health.state) == (3, 1, "up")
    assert "restart attempt 2 failed" in (health.last_failure or "")
    await supervisor.close()


async def test_when_every_attempt_fails_the_supervisor_gives_up(caplog) -> None:
    clock, events = FakeClock(), []
    engines = Engines(clock, fail=(2, 3))
    supervisor = supervise(engines, clock, RestartPolicy(attempts=2, backoff_s=0.5), events)
    first = await supervisor.start()
    with caplog.at_level(logging.WARNING, "speakwatch.health"):
        first.dead = "killed by SIGKILL"
        async with asyncio.timeout(5):
            await supervisor.gave_up.wait()
    assert [s for s in clock.sleeps if s != 0.25] == [0.5, 1.0]
    assert events[-1] == ("failed", "restart attempt 2 failed: RuntimeError: build 3 failed")
    health = supervisor.health
    assert (health.state, health.restart_attempts, health.restarts) == ("failed", 2, 0)
    assert health.retry_after_s is None
    assert supervisor.engine is None and engines.stopped == [1]
    attempts = [r.getMessage() for r in caplog.records if "attempt" in r.getMessage()]
    assert any("attempt 1 of 2 in 0.5 s" in m for m in attempts), attempts
    assert any("attempt 2 of 2 failed" in m for m in attempts), attempts
    critical = [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL]
    assert any("could not be restarted" in m for m in critical)
    await supervisor.close()


async def test_a_crash_loop_uses_up_the_attempts_and_a_stable_engine_starts_afresh() -> None:
    clock, events = FakeClock(), []
    engines = Engines(clock)
    supervisor = supervise(engines, clock, RestartPolicy(attempts=3, stable_s=60.0), events)
    await supervisor.start()

    def backoffs() -> list[float]:
        return [s for s in clock.sleeps if s != 0.25]

    engines.built[-1].dead = "killed"
    await settle(lambda: ("restored", 2) in events)
    clock.now += 61.0  # up for longer than stable_s: the next death starts from attempt 1 again
    engines.built[-1].dead = "killed"
    await settle(lambda: ("restored", 3) in events)
    assert backoffs() == [1.0, 1.0]
    for number in (4, 5):  # dies again at once, twice: attempts 2 and 3
        engines.built[-1].dead = "killed"
        await settle(lambda n=number: ("restored", n) in events)
    assert backoffs() == [1.0, 1.0, 2.0, 4.0]
    engines.built[-1].dead = "killed"  # no attempt left: it gives up without another build
    async with asyncio.timeout(5):
        await supervisor.gave_up.wait()
    assert backoffs() == [1.0, 1.0, 2.0, 4.0] and engines.calls == 5
    assert supervisor.health.failures == 5 and supervisor.health.restarts == 4
    await supervisor.close()


async def test_a_rebuilt_engine_that_is_dead_at_once_counts_as_a_failed_attempt() -> None:
    clock, events = FakeClock(), []
    engines = Engines(clock)
    original = engines.build

    def build_dead_second() -> SimpleNamespace:
        engine = original()
        if engine.number == 2:
            engine.dead = "exited with code 1"
        return engine

    engines.build = build_dead_second  # type: ignore[method-assign]
    supervisor = supervise(engines, clock, RestartPolicy(attempts=2), events)
    (await supervisor.start()).dead = "killed"
    await settle(lambda: ("restored", 3) in events)
    assert engines.stopped == [1, 2]
    assert supervisor.health.restart_attempts == 2 and supervisor.health.restarts == 1
    await supervisor.close()


async def test_closing_during_a_rebuild_shuts_the_late_engine_down() -> None:
    gate = threading.Event()
    built: list[SimpleNamespace] = []
    stopped: list[SimpleNamespace] = []

    def build() -> SimpleNamespace:
        if built:
            gate.wait(5)
        built.append(SimpleNamespace(dead=None))
        return built[-1]

    sup = EngineSupervisor(build, lambda e: e.dead, stopped.append, RestartPolicy(backoff_s=0.0), poll_s=0.01)
    (await sup.start()).dead = "killed"
    await settle(lambda: sup.health.restart_attempts == 1)
    await sup.close()
    gate.set()
    await settle(lambda: len(stopped) == 2)
    assert stopped == built, "the dead engine and the one built after the close are both shut down"


# -- a real Runtime and real Sessions on engines that can die ------------------------------------------


class FakeEngineDead(Exception):
    """Stands in for vLLM's EngineDeadError (what `runtime.request.is_engine_death` looks up)."""


class MortalEngine(ScriptedEngine):
    """A scripted engine that dies on `kill`: its streams raise the engine-dead error, as vLLM's do."""

    def __init__(self, number: int, answer=(), pace: float = 0.0, blocks: int | None = None) -> None:
        super().__init__(answer, pace)
        self.number = number
        self.dead: str | None = None
        if blocks is not None:
            cache = SimpleNamespace(num_gpu_blocks=blocks, block_size=16)
            self.vllm_config = SimpleNamespace(
                cache_config=cache, scheduler_config=SimpleNamespace(watermark=0.0)
            )

    def kill(self) -> None:
        self.dead = "the engine core process EngineCore (pid 4242) killed by SIGKILL"

    async def generate(self, chunks, params, *, request_id: str):
        async for output in super().generate(chunks, params, request_id=request_id):
            if self.dead:
                raise FakeEngineDead(self.dead)
            yield output
        if self.dead:
            raise FakeEngineDead(self.dead)


class Factory:
    """Builds `MortalEngine`s in order; a build can be held (``gate``) or made to fail."""

    def __init__(self, pace: float = 0.005, blocks: tuple[int | None, ...] = (None,)) -> None:
        self.pace, self.blocks = pace, blocks
        self.engines: list[MortalEngine] = []
        self.fail_from: int | None = None  # builds with this number and later raise
        self.gate = threading.Event()
        self.gate.set()

    def build(self) -> MortalEngine:
        number = len(self.engines) + 1
        if number > 1:
            self.gate.wait(10)
        if self.fail_from is not None and number >= self.fail_from:
            raise RuntimeError("no memory for the KV cache")
        blocks = self.blocks[min(number, len(self.blocks)) - 1]
        engine = MortalEngine(number, pace=self.pace, blocks=blocks)
        self.engines.append(engine)
        return engine

    @property
    def current(self) -> MortalEngine:
        return self.engines[-1]


@pytest.fixture
def fake_vllm(monkeypatch) -> None:
    """Chunks reach the scripted engine as (prompt, params); its death reads as vLLM's EngineDeadError."""

    def send(self, prompt: dict, params: SimpleNamespace) -> None:
        self._inputs.put_nowait(SimpleNamespace(prompt=prompt, sampling_params=params))

    monkeypatch.setattr(StreamingRequest, "send", send)
    monkeypatch.setitem(
        sys.modules, "vllm.v1.engine.exceptions", SimpleNamespace(EngineDeadError=FakeEngineDead)
    )


@pytest.fixture
def runtime_on(fake_vllm) -> Iterator[Callable[..., Runtime]]:
    """A `Runtime` whose checkpoint, vision tower and engines are stand-ins; started with `start`."""
    made: list[Runtime] = []

    def make(**settings) -> Runtime:
        defaults = dict(
            turn_tokens=3,
            max_output_tokens=64,
            max_fps=1000.0,
            memory=MemoryConfig(enabled=False),
            change_filter=ChangeFilterSettings(enabled=False),
            engine_poll_s=0.01,
            restart_backoff_s=0.02,
        )
        rt = Runtime(settings=RuntimeSettings(**{**defaults, **settings}))
        rt.info = SimpleNamespace(chat=CHAT, hidden_size=8)  # type: ignore[assignment]
        rt.encoder = StubEncoder()
        rt.sampling_params = lambda max_tokens: SimpleNamespace(max_tokens=max_tokens)  # type: ignore[method-assign]
        made.append(rt)
        return rt

    yield make
    for rt in made:
        rt.executor.shutdown(wait=True)


async def test_an_open_session_survives_the_engine_dying_mid_answer(runtime_on) -> None:
    factory = Factory()
    rt = runtime_on()
    await rt._start_engine(factory.build, lambda e: e.dead, lambda e: None)
    session = rt.open_session(instructions=SYSTEM)
    await session.push_frame(PIXELS, timestamp=0.0)
    await settle(lambda: session.stats().frames_ingested == 1)
    factory.current.answer = [11, IM_END]
    assert await session.ask("What?", max_tokens=8).read() == "t11 t2 "
    answer = session.ask("Comment.", max_tokens=60)  # filler tokens, 5 ms each
    await settle(lambda: answer.usage["output_tokens"] >= 3)
    factory.gate.clear()  # hold the rebuild, to look at the runtime while it is down
    first = factory.current
    first.kill()
    await settle(lambda: not rt.ready)
    with pytest.raises(RuntimeError, match="response failed"):
        await answer.read()
    assert answer.status == "failed" and "SIGKILL" in (answer.error or "")
    health = rt.engine_health
    assert health.state == "restarting" and health.failures == 1 and health.retry_after_s is not None
    # new sessions and questions are refused at once, with the hint
    with pytest.raises(EngineUnavailable, match="being restarted") as refused:
        rt.open_session()
    assert refused.value.retry_after_s == health.retry_after_s
    with pytest.raises(EngineUnavailable) as refused:
        session.ask("Still there?")
    assert refused.value.retry_after_s is not None
    # frames keep being taken in and counted: the newest wait for the engine, older ones are dropped
    for i in range(1, 8):
        await session.push_frame(PIXELS, timestamp=float(i))
    await settle(lambda: session.stats().frames_dropped_by_reason.get("engine_unavailable", 0) >= 3)
    stats = session.stats()
    assert stats.frames_received == 8 and stats.frames_ingested == 1
    factory.gate.set()
    await settle(lambda: rt.ready)
    second = factory.current
    assert second is not first and rt.engine is second and rt.engine_health.restarts == 1
    # the frames that waited for the engine go in first, and their turn samples a token too: script
    # the answer once that turn is over, or the frame turn may take the answer's first token
    await settle(lambda: session.stats().frames_pending == 0 and not session.scheduler.awaiting_output)
    second.answer = [21, IM_END]
    assert await session.ask("Now?", max_tokens=8).read() == "t21 t2 "
    (first_chunk, *_) = [chunk for rid, chunk in second.chunks]
    ids = first_chunk.prompt["prompt_token_ids"]
    system = layout.system_turn(CHAT, SYSTEM)
    assert ids[: len(system)] == system, "the new request carries the system prompt"
    dialogue = layout.prompt_ids(CHAT, layout.dialogue_turn(CHAT, "What?", (11,)))
    assert any(ids[i : i + len(dialogue)] == dialogue for i in range(len(ids))), "and the dialogue"
    stats = session.stats()
    assert stats.frames_ingested > 1, "frames ingested again after the restart"
    dropped = sum(stats.frames_dropped_by_reason.values())
    assert stats.frames_received == stats.frames_ingested + dropped, "every frame is counted"
    assert stats.requests_started == 2 and stats.last_response_status == "completed"
    await rt.close()


async def test_the_session_that_sees_the_engine_die_first_waits_for_the_runtime(runtime_on) -> None:
    factory = Factory()
    rt = runtime_on(engine_poll_s=0.5)  # the runtime's monitor looks late: the session sees it first
    await rt._start_engine(factory.build, lambda e: e.dead, lambda e: None)
    session = rt.open_session()
    answer = session.ask("Comment.", max_tokens=60)
    await settle(lambda: answer.usage["output_tokens"] >= 2)
    factory.current.kill()
    await answer.wait()
    assert answer.status == "failed" and "engine died" in (answer.error or "") and "SIGKILL" in answer.error
    with pytest.raises(EngineUnavailable):
        session.ask("Again?")  # refused, not sent to the dead engine
    await settle(lambda: rt.engine_health.restarts == 1, timeout=10)
    rt.engine.answer = [31, IM_END]
    assert await session.ask("Again?", max_tokens=8).read() == "t31 t2 "
    assert len(factory.engines) == 2 and factory.engines[0].chunks[-1][0] == f"{session.id}-0"
    await rt.close()


async def test_health_turns_within_a_second_at_the_default_poll(runtime_on) -> None:
    factory = Factory()
    rt = runtime_on(engine_poll_s=RuntimeSettings().engine_poll_s)
    await rt._start_engine(factory.build, lambda e: e.dead, lambda e: None)
    factory.gate.clear()
    loop = asyncio.get_running_loop()
    killed = loop.time()
    factory.current.kill()
    await settle(lambda: not rt.ready, timeout=2)
    assert loop.time() - killed < 1.0
    assert rt.stats()["engine_state"] == "restarting"
    factory.gate.set()
    await settle(lambda: rt.ready)
    await rt.close()


async def test_reservations_stand_across_a_restart_and_the_new_capacity_is_read(runtime_on, caplog) -> None:
    # 48 blocks of 16 tokens; a session's 96-token budget reserves 6 blocks + 1 of slack
    factory = Factory(blocks=(1 + 48, 1 + 10))
    rt = runtime_on(budget_tokens=96)
    await rt._start_engine(factory.build, lambda e: e.dead, lambda e: None)
    sessions = [rt.open_session() for _ in range(2)]
    assert rt.kv_capacity is not None and rt.kv_capacity.blocks == 48
    assert rt.kv_tokens_reserved == 2 * 7 * 16
    with caplog.at_level(logging.WARNING, "speakwatch.runtime"):
        factory.current.kill()
        await settle(lambda: rt.engine_health.restarts == 1)
    assert rt.kv_capacity.blocks == 10, "the new engine's cache"
    assert rt.kv_tokens_reserved == 2 * 7 * 16, "the open sessions keep their reservations"
    assert any("reserve" in r.getMessage() for r in caplog.records), "the overcommitment is logged"
    with pytest.raises(SessionLimitReached):
        rt.open_session()
    await sessions[0].close()
    await sessions[1].close()
    assert rt.kv_tokens_reserved == 0
    rt.open_session()  # 7 of 10 blocks
    await rt.close()


async def test_when_the_engine_cannot_come_back_the_runtime_is_failed(runtime_on) -> None:
    factory = Factory()
    rt = runtime_on(restart_attempts=2)
    await rt._start_engine(factory.build, lambda e: e.dead, lambda e: None)
    session = rt.open_session()
    factory.fail_from = 2
    factory.current.kill()
    reason = await asyncio.wait_for(rt.wait_failed(), 10)
    assert "restart attempt 2 failed" in reason and "no memory" in reason
    health = rt.engine_health
    assert (health.state, health.restart_attempts, health.restarts) == ("failed", 2, 0)
    assert not rt.ready
    with pytest.raises(EngineUnavailable, match="could not be restarted") as refused:
        rt.open_session()
    assert refused.value.retry_after_s is None
    with pytest.raises(EngineUnavailable, match="could not be restarted"):
        session.ask("Hello?")
    await session.push_frame(PIXELS, timestamp=0.0)  # the session still counts what it is given
    await settle(lambda: session.stats().frames_received == 1)
    await rt.close()
    assert rt.engine_health.state == "stopped"
