import sys

from headlens.cli import main

sys.exit(main())
