"""The README's ```python blocks work as written.

Convention: a block whose fence is immediately preceded by the line ``<!-- needs-network -->``
(blank lines between are allowed) is only checked to be valid Python; every other python block
is run, in order, in one fresh interpreter (each block with its own globals) with the repository on
PYTHONPATH, HF_HUB_OFFLINE=1 and a temporary working directory (files written by one block are there
for the next).
The test ids say how many blocks ran and how many were only parsed.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
NETWORK_MARK = "<!-- needs-network -->"


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, 1-based
    code: str
    needs_network: bool


def python_blocks(text: str) -> list[Block]:
    """The fenced python blocks of a markdown text, and whether each is marked as needing the network."""
    lines = text.splitlines()
    blocks, fence, start = [], None, 0
    for number, line in enumerate(lines):
        stripped = line.strip()
        if fence is None and stripped.startswith("```"):
            fence, start = stripped[3:].strip(), number
        elif fence is not None and stripped == "```":
            if fence == "python":
                before = [previous.strip() for previous in lines[:start] if previous.strip()]
                marked = bool(before) and before[-1] == NETWORK_MARK
                blocks.append(Block(start + 1, "\n".join(lines[start + 1 : number]), marked))
            fence = None
    assert fence is None, f"README.md: the code fence opened at line {start + 1} is never closed"
    return blocks


def misplaced_marks(text: str) -> list[int]:
    """Lines of network marks that are not followed by a python block."""
    marked = {block.line for block in python_blocks(text) if block.needs_network}
    lines = text.splitlines()
    misplaced = []
    for number, line in enumerate(lines):
        if line.strip() == NETWORK_MARK:
            following = next((n for n in range(number + 1, len(lines)) if lines[n].strip()), None)
            if following is None or following + 1 not in marked:
                misplaced.append(number + 1)
    return misplaced


RUNNER = """
import json, sys, traceback
for line, code in json.load(sys.stdin):
    try:
        exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__main__"})
    except BaseException:
        traceback.print_exc()
        sys.exit(f"README.md block at line {line} failed")
"""


def run_blocks(blocks: list[Block], cwd: Path) -> None:
    """Run the blocks in order in one fresh interpreter, each in its own namespace."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    result = subprocess.run(
        [sys.executable, "-c", RUNNER],
        input=json.dumps([(b.line, b.code) for b in blocks]),
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))
RUNNABLE = [block for block in BLOCKS if not block.needs_network]
NETWORK = [block for block in BLOCKS if block.needs_network]


def test_network_marks_sit_right_before_python_blocks():
    assert misplaced_marks(README.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize("blocks", [NETWORK], ids=[f"{len(NETWORK)}-network-blocks-parsed"])
def test_network_blocks_are_valid_python(blocks):
    for block in blocks:
        ast.parse(block.code, filename=f"README.md:{block.line}")


@pytest.mark.slow
@pytest.mark.parametrize("blocks", [RUNNABLE], ids=[f"{len(RUNNABLE)}-blocks-ran"])
def test_runnable_blocks_run_offline(blocks, tmp_path):
    for block in blocks:
        ast.parse(block.code, filename=f"README.md:{block.line}")
    run_blocks(blocks, tmp_path)


def test_the_convention_itself(tmp_path):
    text = "\n".join(
        [
            "```bash",
            "```python inside bash is not a block",
            "```",
            "```python",
            "x = 1",
            "```",
            NETWORK_MARK,
            "",
            "```python",
            "import timm  # would download",
            "```",
            NETWORK_MARK,
            "text in between",
            "```python",
            "y = 2",
            "```",
        ]
    )
    blocks = python_blocks(text)
    assert [(b.line, b.needs_network) for b in blocks] == [(4, False), (9, True), (14, False)]
    assert misplaced_marks(text) == [12]
    run_blocks(
        [
            Block(1, "from pathlib import Path; Path('made').write_text('ok')", False),
            Block(2, "from pathlib import Path; assert Path('made').read_text() == 'ok'", False),
        ],
        tmp_path,
    )
    with pytest.raises(AssertionError, match="line 3 failed"):
        run_blocks([Block(3, "raise SystemExit(1)", False)], tmp_path)
