"""pyramidkd: a plugin-based knowledge-distillation engine for compressing CNNs."""

from ._version import __version__


def load_model(path, *, plugins=()):
    """A pyramidkd checkpoint (``.pt``) or weights file (``.safetensors``) as a plain
    ``torch.nn.Module`` in eval mode, no recipe needed, with:

    * ``model.transform``: PIL image or uint8 tensor ``[C, H, W]`` -> the normalised
      float input the model was trained on (resize, centre crop, scale, mean/std);
    * ``model.preprocessing``: that recipe as a JSON-able dict; ``model.class_names``.

    ``plugins`` names plugin modules providing a model class that is neither built in
    nor installed. See docs/deploy.md. (Imported on first call: ``import pyramidkd``
    stays cheap.)
    """
    from pyramidkd.engine.deploy.loading import load_model as _load_model

    return _load_model(path, plugins=plugins)
