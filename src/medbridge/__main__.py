"""``python -m medbridge`` (also what ``torchrun -m medbridge`` runs)."""

import sys

from .cli.main import main

sys.exit(main())
