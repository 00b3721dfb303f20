import sys

from torpord.main import main

sys.exit(main())
