#!/usr/bin/env python
"""``sinder-hub registers``: see ``sinder_hub/commands/registers.py``."""

import sys

from sinder_hub.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("registers", sys.argv[1:]))
