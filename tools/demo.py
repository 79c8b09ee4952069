#!/usr/bin/env python
"""The embedded demo: repair the planted-defect backbone on skimage's natural images, on a CPU.

The same as `sinder-hub demo ...`; see `python tools/demo.py --help`. The code lives in
`sinder_hub.commands.demo`.
"""

import sys

from sinder_hub.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("demo", sys.argv[1:]))
