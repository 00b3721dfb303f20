import sys

from torpord.sim.cli import main

sys.exit(main())
