"""Helpers every benchmark script shares: progress lines (stderr, timestamped, so results on stdout stay
clean), the CPU clock over this process and its engine processes, and the engine lock that makes
engine-heavy jobs on a shared machine take turns."""

import sys
import time
from typing import IO


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def take_lock(path: str) -> IO[str] | None:
    """Hold ``flock`` on ``path`` until the process exits (like ``flock PATH <command>``), so engine-heavy
    jobs on a shared machine take turns; an empty path takes no lock."""
    if not path:
        return None
    import fcntl

    handle = open(path, "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log(f"waiting for the engine lock {path} (another engine-heavy job is running) ...")
        started = time.monotonic()
        fcntl.flock(handle, fcntl.LOCK_EX)
        log(f"got the engine lock after {time.monotonic() - started:.0f} s")
    return handle


class CpuClock:
    """CPU seconds of this process (encoder, event loop, vLLM front end) and of its child processes
    (the engine core and any worker)."""

    def __init__(self) -> None:
        import psutil

        self.me = psutil.Process()

    def sample(self) -> tuple[float, float]:
        """(this process, its children), user + system seconds so far."""
        own = self.me.cpu_times()
        children = 0.0
        for child in self.me.children(recursive=True):
            try:
                times = child.cpu_times()
            except Exception:  # a helper process that just exited
                continue
            children += times.user + times.system
        return own.user + own.system, children
