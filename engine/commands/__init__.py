"""The ``pyramidkd`` command line's commands, one module each.

Nothing in the runtime (the rest of :mod:`pyramidkd.engine`) imports this
package; :mod:`pyramidkd.engine.cli` is the thin entry point that builds the
parser from the registered commands and runs the chosen one.

Each command module is a thin adapter: its arguments, one call into the library,
the printing. The work itself lives in the library: runs in
:mod:`pyramidkd.engine.runner`, sweeps and ``run --seeds`` in
:mod:`pyramidkd.engine.sweeps`, reports, plots, model listings and benchmarks in
:mod:`pyramidkd.engine.reporting`.

* :mod:`.registry` — :class:`Commands` (what ``pyramidkd_register_commands``
  receives), the argparse wiring (``--debug`` declared once);
* :mod:`.builtin` — the built-in plugin that registers the commands below;
* :mod:`.arguments` — argument types and groups several commands share;
* :mod:`.run` — ``run RECIPE`` (``--seeds``: a one-cell sweep);
* :mod:`.sweep` — ``sweep SWEEP.toml``;
* :mod:`.validate` — ``validate RECIPE`` (or a sweep file);
* :mod:`.plugins` — ``plugins``;
* :mod:`.models` — ``models``;
* :mod:`.bench_models` — ``bench-models``;
* :mod:`.report` — ``report RUN_DIR...`` (a run, a ``--seeds`` folder or a sweep);
* :mod:`.save_weights`, :mod:`.convert_checkpoint` — sharing checkpoints.

Tables and numbers are formatted by the public :mod:`pyramidkd.engine.formatting`.
"""

from .builtin import builtin_commands
from .registry import Command, Commands, build_parser, collect_commands

__all__ = ["Command", "Commands", "build_parser", "builtin_commands", "collect_commands"]
