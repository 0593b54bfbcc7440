"""``speakwatch-chat`` driven like a person at a terminal: through a pseudo-terminal, in a subprocess."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from client_server import ROOT, ServerThread

from runtime.server.app import SERVER

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _interactive_signals() -> None:
    """Ctrl-C as a terminal's shell gives it: a test run in the background (no job control, e.g. `make`
    from a background job) inherits SIGINT ignored, and the child would never see the Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class PtyProcess:
    """A child process on a pty: what it prints is read back, what we type goes to its terminal."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        self.master, slave = pty.openpty()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            args,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=cwd,
            env=env,
            start_new_session=True,
            preexec_fn=_interactive_signals,
        )
        os.close(slave)
        self.output = ""

    def expect(self, text: str | re.Pattern[str], timeout: float = 15.0) -> str:
        """Read until ``text`` appears in the output (ANSI colours removed); return the output so far."""
        deadline = time.monotonic() + timeout
        while True:
            clean = ANSI.sub("", self.output)
            if text.search(clean) if isinstance(text, re.Pattern) else text in clean:
                return clean
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {text!r}; output so far:\n{clean}")
            ready, _, _ = select.select([self.master], [], [], min(left, 0.2))
            if ready:
                try:
                    data = os.read(self.master, 4096)
                except OSError:  # the child has exited and the pty is closed
                    data = b""
                if not data and self.proc.poll() is not None:
                    raise AssertionError(f"exited ({self.proc.returncode}) before {text!r}:\n{clean}")
                self.output += data.decode("utf-8", "replace")

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def wait(self, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            ready, _, _ = select.select([self.master], [], [], 0.1)
            if ready:
                try:
                    self.output += os.read(self.master, 4096).decode("utf-8", "replace")
                except OSError:
                    break
        return self.proc.wait(max(0.1, deadline - time.monotonic()))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


@pytest.fixture
def chat(server_url: str):
    started: list[PtyProcess] = []

    def run(*extra: str) -> PtyProcess:
        process = PtyProcess([sys.executable, "-m", "client.chat", server_url, *extra], ROOT)
        started.append(process)
        return process

    yield run
    for process in started:
        process.close()


def test_chat_streams_answers_with_video_and_exits_on_eof(chat, fake_server: ServerThread) -> None:
    process = chat("--pattern", "--fps", "5")
    process.expect("you> ")
    session = fake_server.run(lambda: fake_server.runtime.sessions[-1])
    deadline = time.monotonic() + 10
    while fake_server.run(lambda: len(session.frames)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(session.frames) >= 2 and session.frames[0][0] == (480, 640, 3)
    server = fake_server.run(lambda: fake_server._runner.app[SERVER])
    assert server.connections[session.id].max_fps == 5.0  # the inputs' cap: the session is not told it

    process.send(b"what do you see?\n")
    out = process.expect(re.compile(r"you said: what do you see\?.*\n.*\]\s*\r?\n.*you> $", re.S))
    answer, numbers = out.split("model> ")[1].splitlines()[:2]
    assert re.fullmatch(r"seen [1-9]\d* frames, images none, you said: what do you see\? ", answer)
    stats = re.match(
        r"\[ttft \d+ ms \| [\d.]+ tok/s \| (\d+) tokens \| frames sent [1-9]\d* / received", numbers
    )
    assert stats is not None and int(stats[1]) == len(answer.split()), numbers
    assert session.asked[-1].text == "what do you see?"

    process.send(b"\x04")  # Ctrl-D at the prompt: end of input
    assert process.wait() == 0
    assert "Traceback" not in process.output


def test_chat_exits_cleanly_on_ctrl_c(chat) -> None:
    process = chat()
    process.expect("you> ")
    process.send(b"tell me forever\n")
    process.expect("w3 ")
    os.killpg(process.proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
    assert process.wait() == 130
    assert "Traceback" not in process.output


def test_chat_reports_a_server_it_cannot_reach(chat) -> None:
    process = PtyProcess([sys.executable, "-m", "client.chat", "http://127.0.0.1:9"], ROOT)
    try:
        assert process.wait(15) == 1
        assert "connection_failed" in process.output and "Traceback" not in process.output
    finally:
        process.close()
