"""The ``pyramidkd`` command line's commands, one module each.

Nothing in the runtime (the rest of :mod:`pyramidkd.engine`) imports this
package; :mod:`pyramidkd.engine.cli` is the thin entry point that builds the
parser from the registered commands and runs the chosen one.

* :mod:`.registry` — :class:`Commands` (what ``pyramidkd_register_commands``
  receives), the argparse wiring (``--debug`` declared once), the command lookup;
* :mod:`.builtin` — the built-in plugin that registers the commands below;
* :mod:`.run` — ``run RECIPE`` (``--seeds`` goes to :mod:`.seeds`);
* :mod:`.seeds` — one run per seed, mean ± std per stage (also read back by ``report``);
* :mod:`.validate` — ``validate RECIPE``;
* :mod:`.plugins` — ``plugins``;
* :mod:`.models` — ``models`` and the MAC counter;
* :mod:`.bench_models` — ``bench-models``;
* :mod:`.report` — ``report RUN_DIR...``, with :mod:`.report_seeds` for a
  ``--seeds`` folder and :mod:`.plots` for every PNG.

Tables and numbers are formatted by the public :mod:`pyramidkd.engine.formatting`.
"""

from .registry import Command, Commands, build_parser, builtin_commands, collect_commands

__all__ = ["Command", "Commands", "build_parser", "builtin_commands", "collect_commands"]
