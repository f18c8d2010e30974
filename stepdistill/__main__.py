"""``python -m stepdistill`` / ``accelerate launch -m stepdistill ...``."""

import sys

from .cli import main


sys.exit(main())
