#!/usr/bin/env python
"""Push a repaired model folder (timm or transformers export, or a repair run folder) to the Hugging Face hub.

The same as `sinder-hub push ...`; see `python tools/push.py --help`. The code lives in
`sinder_hub.commands.push`.
"""

import sys

from sinder_hub.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("push", sys.argv[1:]))
