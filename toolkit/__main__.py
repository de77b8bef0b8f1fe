"""``python -m toolkit`` runs the ``codec`` command."""

import sys

from toolkit.cli import main

sys.exit(main())
