"""Reports of finished work, read back from the folders it wrote: a run, a
``run --seeds`` folder, a sweep; the plots; the model listing and benchmark.

* :mod:`.report` — :func:`build_report` (which kind of folder, then its report) and
  :func:`format_markdown`;
* :mod:`.run_report`, :mod:`.seeds_report`, :mod:`.sweep_report` — one kind each;
* :mod:`.readers` — what every report reads (epoch records, MACs of a stage's
  checkpoint, plugin hosts to rebuild models) and where plots go;
* :mod:`.markdown` — the markdown block every report shares;
* :mod:`.plots` — every PNG (matplotlib's Agg canvas, written atomically);
* :mod:`.models`, :mod:`.bench` — ``pyramidkd models`` and ``bench-models``.

The commands (:mod:`pyramidkd.engine.commands`) call into it; it never imports them.
"""

from .report import build_report, format_markdown

__all__ = ["build_report", "format_markdown"]
