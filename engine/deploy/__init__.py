"""From a trained stage to a deployable file: ``pyramidkd export`` and ``pyramidkd.load_model``.

* :mod:`.preprocessing` — how raw images become inputs, recorded in every checkpoint
  and carried by every exported file (no other engine import: the checkpoint writer uses it);
* :mod:`.loading` — a checkpoint as a plain ``nn.Module`` with its ``transform``
  (``pyramidkd.load_model``);
* :mod:`.runs` — a run's finished stage, its plugin host and its test images;
* :mod:`.formats` — one exporter per format (``onnx``, ``pt2``, ``torchscript``), each
  giving the file's bytes and a runner that executes them;
* :mod:`.verify` — the exported file run on the stage's test images against the checkpoint;
* :mod:`.export` — the command's one library call (:func:`.export.export_stage`);
* :mod:`.quantize` — ``--quantize int8``: ONNX Runtime static quantisation, calibrated on
  training images drawn with the run's seed, judged by its accuracy;
* :mod:`.bench`, :mod:`.timing`, :mod:`.bench_report` — ``pyramidkd bench-deploy``: every
  exported file timed on its runtime next to PyTorch eager and torch.compile;
* :mod:`.errors` — :class:`~.errors.ExportError` and the missing ``deploy`` extra.

A new format (an int8 one, say) is one more :class:`.formats.ExportFormat` in
:data:`.formats.FORMATS`, or its own exporter fed by :func:`.export.export_source` and
finished by :func:`.export.write_verified` (``tolerance=None``: judged by accuracy);
verification and the report beside the file come with it.
This package's ``__init__`` imports nothing, so importing :mod:`.preprocessing`
stays cheap.
"""
