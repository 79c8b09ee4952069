"""tools/install.sh (what the Makefile installs with): uv gets pip's indexes, links and caps; pip when uv fails.

The virtual environment is a stand-in: its ``python`` and ``uv`` are shell scripts that log their
arguments and answer ``pip config get`` as a machine with local indexes would.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "install.sh"

PYTHON = """#!/bin/sh
echo "python $*" >> "$LOG"
case "$*" in
  "-m pip install -q uv") exit "${UV_INSTALL_FAILS:-0}" ;;
  "-m pip config get global.extra-index-url") echo "file:///opt/a/simple file:///opt/b/simple" ;;
  "-m pip config get global.constraint") echo "/etc/caps.txt" ;;
  "-m pip config get"*) exit 1 ;;
esac
"""
UV = """#!/bin/sh
echo "uv $*" >> "$LOG"
exit "${UV_FAILS:-0}"
"""


@pytest.fixture
def venv(tmp_path):
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name, text in (("python", PYTHON), ("uv", UV)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return tmp_path / "venv"


def install(venv: Path, *args: str, **env: str) -> list[str]:
    log = venv / "log"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    done = subprocess.run(
        ["bash", str(SCRIPT), *args], env={**clean, "VENV": str(venv), "LOG": str(log), **env}, capture_output=True
    )
    assert done.returncode == 0, done.stderr
    return log.read_text().splitlines()


def test_uv_gets_the_indexes_and_caps_pip_is_configured_with(venv):
    calls = install(venv, "torch==2.14.1", "-e", ".[test]")
    (uv,) = [call for call in calls if call.startswith("uv ")]
    assert uv.startswith(f"uv pip install -q --python {venv}/bin/python --index-strategy unsafe-best-match ")
    for expected in (
        "--extra-index-url file:///opt/a/simple --extra-index-url file:///opt/b/simple",
        "--constraint /etc/caps.txt",
    ):
        assert expected in uv, uv
    assert uv.endswith(" torch==2.14.1 -e .[test]")
    assert "--default-index" not in uv and "--find-links" not in uv  # pip has none configured here
    assert not any(call.startswith("python -m pip install -q torch") for call in calls)
    assert "python -m pip install -q uv" not in calls  # already in the environment: not installed again


def test_pip_environment_variables_win_over_pip_config(venv):
    calls = install(venv, "numpy", PIP_FIND_LINKS="/opt/wheels", PIP_INDEX_URL="https://mirror/simple")
    (uv,) = [call for call in calls if call.startswith("uv ")]
    assert "--find-links /opt/wheels" in uv and "--default-index https://mirror/simple" in uv


def test_uv_is_installed_with_pip_when_missing(venv):
    (venv / "bin" / "uv").rename(venv / "uv-elsewhere")
    calls = install(venv, "numpy")
    assert calls[0] == "python -m pip install -q uv"


@pytest.mark.parametrize("failure", [{"UV_INSTALL_FAILS": "1"}, {"UV_FAILS": "1"}])
def test_pip_installs_when_uv_cannot(venv, failure):
    if "UV_INSTALL_FAILS" in failure:  # no uv in the environment, and pip cannot install it
        (venv / "bin" / "uv").unlink()
    calls = install(venv, "torch==2.14.1", "-e", ".", **failure)
    assert calls[-1] == "python -m pip install -q torch==2.14.1 -e ."
