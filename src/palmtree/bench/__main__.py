"""``python -m palmtree.bench``: the command line (and the isolated worker's entry point)."""

import sys

from .cli import main

sys.exit(main())
