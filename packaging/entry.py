"""Entry script frozen by PyInstaller: the same main() as the console script."""

import sys

from dynamo_run.cli import main

if __name__ == "__main__":
    sys.exit(main())
