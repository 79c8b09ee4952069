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

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory):
    """A new venv with the built wheel installed (its dependencies borrowed from this environment)."""
    root = tmp_path_factory.mktemp("cli")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(root / "dist"), str(REPO)],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (root / "dist").glob("sinder_hub-*.whl")
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


def test_the_console_command_lists_and_runs_every_sub_command(fresh_venv, tmp_path):
    done = run(fresh_venv, fresh_venv / "bin" / "sinder-hub", "--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for name in COMMANDS:
        assert name in done.stdout
    located = run(
        fresh_venv, fresh_venv / "bin" / "python", "-c", "import sinder_hub; print(sinder_hub.__file__)", cwd=tmp_path
    )
    assert located.stdout.strip().startswith(str(fresh_venv)), located  # the installed copy, not the checkout
    for name in ("repair", "export", "push", "diagnose", "evaluate", "demo"):
        helped = run(fresh_venv, fresh_venv / "bin" / "sinder-hub", name, "--help", cwd=tmp_path)
        assert helped.returncode == 0 and "usage:" in helped.stdout, (name, helped.stderr[-1000:])
    unknown = run(fresh_venv, fresh_venv / "bin" / "sinder-hub", "repiar", cwd=tmp_path)
    assert unknown.returncode == 2 and "unknown command 'repiar'" in unknown.stderr
    bad = run(
        fresh_venv,
        fresh_venv / "bin" / "sinder-hub",
        "repair",
        "--data",
        tmp_path / "nope",
        "--output",
        tmp_path / "run",
        cwd=tmp_path,
    )
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "nope" in bad.stderr, bad.stderr
    assert not (tmp_path / "run").exists()


def test_accelerate_launch_runs_the_module(fresh_venv, tmp_path):
    from sinder_hub.data import TRAIN_SAMPLES, sample_images

    data = tmp_path / "photos"
    data.mkdir()
    for name, image in list(sample_images(TRAIN_SAMPLES).items())[:2]:
        image.resize((224, 224)).save(data / f"{name}.png")
    done = run(
        fresh_venv,
        fresh_venv / "bin" / "python",
        "-m",
        "accelerate.commands.launch",
        "--cpu",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "sinder_hub.cli",
        "repair",
        "--model",
        "planted-swiglu",
        "--data",
        data,
        "--output",
        tmp_path / "run",
        "--resolution",
        "224",
        "--limit-layers",
        "3",
        "--directions-method",
        "expected",
        "--held-out",
        "astronaut",
        "--num-workers",
        "0",
        "--quiet",
        "--max-steps",
        "2",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "repair_report.json").read_text())
    assert report["steps"] == 2 and report["data_passes"] == 1.0
