"""Browser tests never skip silently: without Chromium they fail, unless SPEAKWATCH_SKIP_BROWSER=1 opts out
(the gate is ``pytest_runtest_setup`` in tests/conftest.py)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

CONFTEST = Path(__file__).with_name("conftest.py")


def load_conftest():
    spec = importlib.util.spec_from_file_location("speakwatch_root_conftest", CONFTEST)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_browser_gate(tmp_path: Path) -> None:
    gate = load_conftest().browser_gate
    present = tmp_path / "chromium"
    present.touch()
    missing = str(tmp_path / "chromedriver")
    assert gate({}, [str(present)]) is None
    action, why = gate({}, [str(present), missing])
    assert action == "fail" and missing in why and "SPEAKWATCH_SKIP_BROWSER=1" in why
    for value in ("1", "true", "YES"):
        assert gate({"SPEAKWATCH_SKIP_BROWSER": value}, [missing])[0] == "skip"
    for value in ("", "0", "no"):
        assert gate({"SPEAKWATCH_SKIP_BROWSER": value}, [missing])[0] == "fail"


@pytest.mark.parametrize("opt_out", [False, True])
def test_a_browser_test_without_chromium_fails_unless_opted_out(tmp_path: Path, opt_out: bool) -> None:
    """The real hook, in a pytest of its own: the conftest with Chromium pointed at a missing file."""
    text = CONFTEST.read_text()
    assert text.count('CHROMIUM = "/usr/bin/chromium"') == 1
    (tmp_path / "conftest.py").write_text(text.replace('"/usr/bin/chromium"', f'"{tmp_path / "none"}"'))
    ini = "[pytest]\nasyncio_default_fixture_loop_scope = function\nmarkers =\n    browser: drives Chromium\n"
    (tmp_path / "pytest.ini").write_text(ini)
    page = "import pytest\n\n\n@pytest.mark.browser\ndef test_page():\n    pass\n\n\n"
    (tmp_path / "test_page.py").write_text(page + "def test_other():\n    pass\n")
    env = {k: v for k, v in os.environ.items() if k != "SPEAKWATCH_SKIP_BROWSER"}
    if opt_out:
        env["SPEAKWATCH_SKIP_BROWSER"] = "1"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rA", "-c", "pytest.ini", "."],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = run.stdout + run.stderr
    if opt_out:
        assert run.returncode == 0, out
        assert "1 passed, 1 skipped" in out and "SPEAKWATCH_SKIP_BROWSER=1" in out
    else:
        assert run.returncode == 1, out
        assert "1 passed, 1 error" in out and str(tmp_path / "none") in out
