#!/usr/bin/env python
"""Repair a DINOv2 backbone with SINDER (Algorithm 1) and write the repaired weights.

The same as `sinder-hub repair ...`; see `python tools/repair.py --help`. The code lives in
`sinder_hub.commands.repair`.
"""

import sys

from sinder_hub.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("repair", sys.argv[1:]))
