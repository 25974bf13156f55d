"""The installed version, in a module of its own: engine modules read it from here,
so that ``pyramidkd`` (whose ``load_model`` calls into the engine) and the engine
do not import each other."""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("pyramidkd")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
