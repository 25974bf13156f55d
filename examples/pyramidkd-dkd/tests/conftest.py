"""Import the installed ``pyramidkd_dkd``; from a source checkout that is not
installed, fall back to ``../src``."""

import importlib.util
import os
import sys

if importlib.util.find_spec("pyramidkd_dkd") is None:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))
