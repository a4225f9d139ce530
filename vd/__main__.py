import sys

from vd.cli import main

sys.exit(main())
