"""scripts/setup.sh installs quietly: setuptools' "Editable installation" banner is filtered, and
nothing else is (a real error still reaches the console)."""

from __future__ import annotations

import re
import subprocess
import sys

from harness import REPO

BANNER = ("from setuptools.warnings import InformationOnly; "
          "InformationOnly.emit('Editable installation.', 'Please be careful with folders')")


def _editable_install_filter() -> str:
    lines = [ln for ln in (REPO / "scripts" / "setup.sh").read_text().splitlines() if re.search(r"pip install\b.*\s-e\s", ln)]
    assert len(lines) == 1, lines
    m = re.match(r'\s*PYTHONWARNINGS="([^"]+)"\s', lines[0])
    assert m, f"the editable install runs without a warning filter, so pip prints setuptools' banner: {lines[0]}"
    return m.group(1)


def _python(code: str, filt: str) -> subprocess.CompletedProcess:
    # The build backend is a plain Python subprocess of pip: PYTHONWARNINGS reaches it the same way.
    return subprocess.run([sys.executable, "-c", code], env={"PYTHONWARNINGS": filt, "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=60)


def test_editable_banner_is_filtered_and_errors_are_not():
    filt = _editable_install_filter()
    quiet = _python(BANNER, filt)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    loud = _python(BANNER.replace("Editable installation.", "Something else."), filt)
    assert "Something else" in loud.stderr  # other setuptools warnings are kept
    failing = _python("raise SystemExit('error: build failed')", filt)
    assert failing.returncode == 1 and "build failed" in failing.stderr
