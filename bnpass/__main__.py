"""``python -m bnpass`` runs the ``bnpass`` command line (bnpass/cli.py)."""

import sys

from bnpass.cli import main

sys.exit(main())
