"""``python -m transferlab.cli`` (what ``torchrun -m transferlab.cli run study.yaml`` starts on every rank)."""

import sys

from transferlab.cli.main import main

sys.exit(main())
