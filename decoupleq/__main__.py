"""``python -m decoupleq``: the same command line as ``decoupleq``."""
import sys

from .cli import main

sys.exit(main())
