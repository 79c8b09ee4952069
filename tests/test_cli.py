"""The ``sinder-hub`` console command, from a wheel installed into a fresh virtual environment."""

import json
import os
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from sinder_hub.cli import COMMANDS

pytestmark = pytest.mark.slow  # models end to end, subprocesses or a browser: make test-fast skips this file

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory, built_wheel):
    """A new venv with the built wheel installed (its dependencies borrowed from this environment)."""
    root = tmp_path_factory.mktemp("cli")
    wheel = built_wheel
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    ours = [p for p in {sysconfig.get_paths()["purelib"], *site.getsitepackages()} if Path(p).is_dir()]
    Path(purelib, "borrowed_dependencies.pth").write_text("\n".join(ours) + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
        check=True,
        capture_output=True,
    )
    return venv


def run(venv, *args, cwd):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}:{env['PATH']}"
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


# runs argv lists with the installed copy's main() in one interpreter (each start imports torch and timm)
RUN_ARGVS = """
import contextlib, io, json, sys
import sinder_hub
from sinder_hub.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit:
            code = exit.code
    results.append({"code": code or 0, "stdout": out.getvalue(), "stderr": err.getvalue()})
print(json.dumps({"file": sinder_hub.__file__, "results": results}))
"""


def test_the_console_command_lists_and_runs_every_sub_command(fresh_venv, tmp_path):
    done = run(fresh_venv, fresh_venv / "bin" / "sinder-hub", "--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for name in COMMANDS:
        assert name in done.stdout
    helps = [[name, "--help"] for name in COMMANDS if name != "view"]
    bad_data = ["repair", "--data", str(tmp_path / "nope"), "--output", str(tmp_path / "run")]
    argvs = [*helps, ["repiar"], bad_data]
    done = run(fresh_venv, fresh_venv / "bin" / "python", "-c", RUN_ARGVS, json.dumps(argvs), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.splitlines()[-1])
    assert answer["file"].startswith(str(fresh_venv)), answer["file"]  # the installed copy, not the checkout
    *helped, unknown, bad = answer["results"]
    for argv, result in zip(helps, helped):
        assert result["code"] == 0 and "usage:" in result["stdout"], (argv, result)
    assert unknown["code"] == 2 and "unknown command 'repiar'" in unknown["stderr"], unknown
    assert bad["code"] == 2 and len(bad["stderr"].strip().splitlines()) == 1 and "nope" in bad["stderr"], bad
    assert not (tmp_path / "run").exists()
