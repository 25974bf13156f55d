"""The data path of a run, one concern per module (nothing is imported here, so
that :mod:`pyramidkd.engine.components` can name these types without a cycle):

* :mod:`.splits` — :class:`~.splits.TensorSplit` (a split held as tensors) and its normalisation;
* :mod:`.augmentation` — :class:`~.augmentation.Augmentation`, crops and flips of whole batches;
* :mod:`.decoded_cache` — images decoded once into a file under the cache folder
  (``cached_tensors``, ``decode_images``);
* :mod:`.pipeline` — which pipeline a run takes (``[train] pipeline``: tensor or
  ``DataLoader``), loading the data once, the label check, placement on the GPU;
* :mod:`.plan` — :class:`~.plan.BatchPlan`, the batch geometry (global and per-rank
  batch sizes, steps per epoch, the short-tail rule, each epoch's order and the
  ranks' shares), written once and asked by everything below;
* :mod:`.batches` — the batches the loop iterates on either pipeline
  (:class:`~.batches.TensorBatches`, :class:`~.batches.LoaderBatches`, the ``DataLoader`` samplers).

Plugins reach these through :mod:`pyramidkd.engine` (``TensorSplit``,
``Augmentation``, ``cached_tensors``, ``decode_images``); the image data sets' side
(the same splits and geometry for ``load`` and ``load_tensors``) is
:mod:`pyramidkd.plugins.datasets.images`.
"""
