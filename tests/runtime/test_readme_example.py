"""The embedded-SDK example in the README runs as written (a fresh process, the built-in model)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.engine, pytest.mark.timeout(900)]

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_sdk_example_runs(tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(block for block in blocks if "Runtime()" in block and "asyncio.run" in block)
    script = tmp_path / "example.py"
    script.write_text(example)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=800, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ours = [line for line in done.stdout.splitlines() if line.strip() and "INFO" not in line]
    stats = [line for line in ours if line.startswith("SessionStats(") and "frames_ingested=" in line]
    assert stats, done.stdout[-3000:]
    assert "frames_received=1," in stats[-1] and "frames_ingested=1," in stats[-1], stats[-1]
