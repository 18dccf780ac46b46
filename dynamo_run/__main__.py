"""``python -m dynamo_run``."""

import sys

from dynamo_run.cli import main

sys.exit(main())
