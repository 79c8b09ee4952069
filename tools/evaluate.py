#!/usr/bin/env python
"""Feature quality of a frozen backbone, optionally beside a second one (original vs repaired).

The same as `sinder-hub evaluate ...`; see `python tools/evaluate.py --help`. The code lives in
`sinder_hub.commands.evaluate`.
"""

import sys

from sinder_hub.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("evaluate", sys.argv[1:]))
