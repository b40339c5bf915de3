import sys

from ib.cli import main

sys.exit(main())
