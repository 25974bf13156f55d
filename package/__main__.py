"""`python -m pyramidkd ...` (also what torchrun launches)."""

import sys

from pyramidkd.engine.cli import main

if __name__ == "__main__":
    sys.exit(main())
