#!/usr/bin/env python
"""Export a repaired backbone as stock timm and/or transformers folders.

The same as `sinder-hub export ...`; see `python tools/export.py --help`. The code lives in
`sinder_hub.commands.export`.
"""

import sys

from sinder_hub.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("export", sys.argv[1:]))
