"""`python -m torpor.cli`: the same as `torporctl`."""

import sys

from torpor.cli.main import main

sys.exit(main())
