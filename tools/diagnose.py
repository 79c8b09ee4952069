#!/usr/bin/env python
"""Defect statistics and pictures of a backbone (paper §2, Fig. 1 and Fig. 2d), optionally beside a second one.

The same as `sinder-hub diagnose ...`; see `python tools/diagnose.py --help`. The code lives in
`sinder_hub.commands.diagnose`.
"""

import sys

from sinder_hub.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("diagnose", sys.argv[1:]))
