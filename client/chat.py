"""``speakwatch-chat URL``: talk to a speakwatch server from a terminal, optionally with a video feed.

Each line typed is one question; the answer streams after ``model>`` as it is generated, followed by
one dim line of numbers (time to first token, tokens/s, frames sent/received/ingested/dropped, lag).
``--video FILE`` (looped) or ``--pattern`` (the synthetic counter pattern) becomes the session's
camera, pushed as ``input_video.append`` frames at ``--fps``. EOF (Ctrl-D) or Ctrl-C exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import threading
from collections.abc import Sequence
from typing import Any, TextIO

from runtime.wire import SessionStats

from .remote import RealtimeError, RemoteResponse, RemoteSession, connect

PROMPT = "you> "
ANSWER = "model> "


class LineReader:
    """Lines of a blocking stream, read by a daemon thread so Ctrl-C and exit never wait for it."""

    def __init__(self, stream: TextIO) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[str | None] = asyncio.Queue()
        self._thread = threading.Thread(target=self._run, args=(stream,), name="stdin", daemon=True)
        self._thread.start()

    def _run(self, stream: TextIO) -> None:
        try:
            for line in iter(stream.readline, ""):
                self._loop.call_soon_threadsafe(self._queue.put_nowait, line)
        except (OSError, ValueError):
            pass
        finally:
            with contextlib.suppress(RuntimeError):  # the loop is already closed: nobody is listening
                self._loop.call_soon_threadsafe(self._queue.put_nowait, None)

    async def readline(self) -> str | None:
        """The next line without its newline, or None at end of input."""
        line = await self._queue.get()
        if line is None:
            self._queue.put_nowait(None)
            return None
        return line.rstrip("\r\n")


class Terminal:
    """Where the chat writes: the answer to stdout, notices to stderr, numbers dimmed on a colour tty."""

    def __init__(self, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> None:
        self.out = out
        self.err = err
        self.color = out.isatty() and not os.environ.get("NO_COLOR")

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def dim(self, text: str) -> str:
        return f"\x1b[2m{text}\x1b[0m" if self.color else text

    def notice(self, text: str) -> None:
        self.out.flush()
        self.err.write(f"{text}\n")
        self.err.flush()


def stats_line(response: RemoteResponse, stats: SessionStats, frames_sent: int = 0) -> str:
    """One line of numbers for one answer."""

    def num(value: float | int | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    parts = [
        f"ttft {num(response.ttft_ms, '.0f')} ms",
        f"{num(response.tokens_per_s, '.1f')} tok/s",
        f"{num((response.usage or {}).get('output_tokens'), 'd')} tokens",
    ]
    if frames_sent or stats.frames_received:
        parts.append(
            f"frames sent {frames_sent} / received {stats.frames_received} / "
            f"ingested {stats.frames_ingested} / dropped {stats.frames_dropped}"
        )
        parts.append(f"lag p50 {num(stats.frame_lag_p50_ms, '.0f')} ms")
    if response.status not in (None, "completed"):
        parts.append(str(response.status))
    return "[" + " | ".join(parts) + "]"


def video_source(args: argparse.Namespace) -> Any | None:
    """The frame source for ``--video``/``--pattern`` (streams is only imported when one is asked for)."""
    if not args.video and not args.pattern:
        return None
    from streams import FileSource, SyntheticSource

    if args.video:
        return FileSource(args.video, loop=True, fps=args.fps, max_size=(640, 640))
    return SyntheticSource(30.0, (640, 480), fps=args.fps)


async def push_video(session: RemoteSession, source: Any, term: Terminal) -> None:
    """Push every frame the source delivers (it already paces them to ``--fps``) until cancelled."""
    try:
        async with source:
            async for frame in source:
                await session.push_frame(frame.rgb, frame.timestamp)
    except asyncio.CancelledError:
        raise
    except RealtimeError as exc:
        if exc.code != "connection_closed":
            term.notice(f"! video stopped: {exc}")
    except Exception as exc:
        term.notice(f"! video stopped: {type(exc).__name__}: {exc}")


async def answer(session: RemoteSession, question: str, term: Terminal) -> None:
    """Ask one question and stream the answer, then its numbers."""
    term.write(ANSWER)
    response = session.ask(question)
    try:
        async for delta in response:
            term.write(delta)
    except RealtimeError as exc:
        term.write("\n")
        term.notice(f"! {exc}")
    else:
        term.write("\n")
    term.write(term.dim(stats_line(response, session.stats(), session.frames_sent)) + "\n")


async def chat(args: argparse.Namespace, term: Terminal, stdin: TextIO) -> int:
    video = {"max_fps": args.fps} if args.video or args.pattern else None
    session = await connect(
        args.url,
        args.api_key,
        instructions=args.instructions,
        max_output_tokens=args.max_tokens,
        video=video,
        on_error=lambda exc: term.notice(f"! server: {exc}"),
    )
    source = video_source(args)
    pusher = asyncio.create_task(push_video(session, source, term)) if source is not None else None
    reader = LineReader(stdin)
    what = f", video: {args.video or 'test pattern'} at {args.fps:g} fps" if source is not None else ""
    term.notice(f"connected to {args.url} (session {session.id}{what}); Ctrl-D to quit")
    try:
        while not session.closed:
            term.write(PROMPT)
            line = await reader.readline()
            if line is None:
                term.write("\n")
                break
            question = line.strip()
            if not question:
                continue
            if question in ("/quit", "/exit"):
                break
            if question == "/stats":
                term.write(term.dim(repr(session.stats())) + "\n")
                continue
            await answer(session, question, term)
        if session.closed:
            term.notice(f"! {session.close_reason}")
            return 1
        return 0
    finally:
        if pusher is not None:
            pusher.cancel()
            await asyncio.gather(pusher, return_exceptions=True)
        await session.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="speakwatch-chat", description="Chat with a speakwatch server from the terminal."
    )
    parser.add_argument("url", help="server URL: http://HOST:PORT or ws://HOST:PORT/v1/realtime")
    parser.add_argument("--api-key", default=None, help="API key (default: $SPEAKWATCH_API_KEY)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--video", metavar="FILE", help="a video file (or RTSP URL) to use as the camera")
    source.add_argument("--pattern", action="store_true", help="send the synthetic test pattern as video")
    parser.add_argument("--fps", type=float, default=2.0, help="frames per second to send (default 2)")
    parser.add_argument("--instructions", default=None, help="system instructions for the session")
    parser.add_argument("--max-tokens", type=int, default=None, help="longest answer in tokens")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``speakwatch-chat`` and ``python -m client.chat``; returns the exit status."""
    args = build_parser().parse_args(argv)
    if not args.fps > 0:
        build_parser().error("--fps must be positive")
    if args.video and "://" not in args.video and not os.path.exists(args.video):
        build_parser().error(f"no such video file: {args.video}")
    term = Terminal()
    try:
        return asyncio.run(chat(args, term, sys.stdin))
    except KeyboardInterrupt:
        term.write("\n")
        return 130
    except RealtimeError as exc:
        term.notice(f"speakwatch-chat: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
