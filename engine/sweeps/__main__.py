"""``python -m pyramidkd.engine.sweeps JOB.json``: run one sweep job in a fresh process
(the local launcher's worker). A package ``__main__`` rather than ``-m ...sweeps.jobs``:
``pyramidkd.engine`` imports ``jobs`` itself, and running an imported module as
``__main__`` makes Python warn (runpy's "found in sys.modules") in every worker's log."""

import sys

from .jobs import main

sys.exit(main())
