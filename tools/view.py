#!/usr/bin/env python
"""Open the browser viewer: original vs repaired feature maps of your images.

The same as `sinder-hub view ...`; see `python tools/view.py --help`. The code lives in
`sinder_hub.commands.view`.
"""

import sys

from sinder_hub.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("view", sys.argv[1:]))
