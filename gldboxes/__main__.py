"""``python -m gldboxes`` runs the ``gldboxes`` command."""

import sys

from gldboxes.cli.main import main

sys.exit(main())
