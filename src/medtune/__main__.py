"""``python -m medtune ...`` runs the CLI (used where the ``medtune`` script is not on PATH, e.g. from Slicer)."""

import sys

from medtune.cli import main

sys.exit(main())
