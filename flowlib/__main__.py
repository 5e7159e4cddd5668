"""`python -m flowlib ...` runs the command line (see `flowlib.cli`)."""

import sys

from .cli import main

sys.exit(main())
