"""Progress lines for the benchmark scripts (stderr, timestamped), so results on stdout stay clean."""

import sys
import time


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
