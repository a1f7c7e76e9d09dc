"""`python -m mim <stage> ...`, the same as the `mim` command (which another tool may also install:
OpenMMLab's openmim has a `mim` command too)."""

import sys

from pipelines.cli import main

sys.exit(main())
