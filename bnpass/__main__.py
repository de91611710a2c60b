"""``python -m bnpass`` runs the ``bnpass`` command line (bnpass/inspect/cli.py)."""

import sys

from bnpass.inspect.cli import main

sys.exit(main())
