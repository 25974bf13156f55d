"""The plugin host a run calls through (:class:`PluginHost`): a pluggy plugin
manager plus the component registries built from its registration hooks.

Apart from :mod:`~pyramidkd.engine.host`, which builds it (loading the hook
specifications and the plugins), so that what lifecycle hooks receive
(:class:`~pyramidkd.engine.lifecycle.Run`, which holds the host) does not import
the hook specifications that name it.
"""

from __future__ import annotations


import attrs
import pluggy

from .components import COMPONENT_KINDS
from .errors import PluginError, RecipeError, UserError, did_you_mean

REGISTRATION_HOOKS = {
    "scheme": "pyramidkd_register_schemes",
    "loss": "pyramidkd_register_losses",
    "dataset": "pyramidkd_register_datasets",
    "model": "pyramidkd_register_models",
    "logger": "pyramidkd_register_loggers",
    "launcher": "pyramidkd_register_launchers",
}


@attrs.define
class PluginOrigin:
    """Where a plugin came from, for ``pyramidkd plugins`` and error messages."""

    source: str  # "builtin" | "entry-point" | "local" | "extra"
    distribution: str
    version: str


@attrs.define
class Registration:
    cls: type
    plugin: str


class Registry:
    """Component classes of one kind, by name."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Registration] = {}

    def add(self, cls: type, plugin: str) -> None:
        base = COMPONENT_KINDS[self.kind]
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise PluginError(
                f"plugin {plugin!r} registered {cls!r} as a {self.kind}, but it is not a subclass of {base.__name__}",
                fix=f"derive it from pyramidkd.engine.{base.__name__}",
            )
        if not cls.name:
            raise PluginError(
                f"plugin {plugin!r} registered {self.kind} class {cls.__name__} without a name",
                fix="set the class attribute `name`",
            )
        if not attrs.has(cls.Params):
            raise PluginError(
                f"{self.kind} {cls.name!r} from plugin {plugin!r}: Params must be an attrs class",
                fix="decorate its Params with @attrs.define",
            )
        existing = self._entries.get(cls.name)
        if existing is not None:
            raise PluginError(
                f"two plugins provide a {self.kind} named {cls.name!r}: {existing.plugin!r} and {plugin!r}",
                fix="uninstall or disable one of them, or rename one component",
            )
        self._entries[cls.name] = Registration(cls, plugin)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self):
        return iter(self._entries.values())

    def get(self, name: str, *, file: str | None = None, key: str | None = None) -> type:
        try:
            return self._entries[name].cls
        except KeyError:
            pass
        known = self.names()
        hint = did_you_mean(name, known)
        raise RecipeError(
            f"unknown {self.kind} {name!r}; available: {', '.join(known) or '(none)'}",
            file=file,
            key=key,
            fix=f"{hint}use one of the names above, or install the plugin that provides {name!r}",
        )

    def provider(self, name: str) -> str:
        return self._entries[name].plugin


@attrs.define
class PluginHost:
    """A plugin manager plus the registries built from it (one per run)."""

    pm: pluggy.PluginManager
    origins: dict[str, PluginOrigin]
    registries: dict[str, Registry]

    def registry(self, kind: str) -> Registry:
        return self.registries[kind]

    @property
    def hook(self):
        return self.pm.hook

    def call(self, hook_name: str, on_error=None, **kwargs) -> None:
        """Call a lifecycle hook. An exception from a plugin becomes a
        :class:`PluginHookError` naming the plugin and the hook; ``on_error`` runs
        first (the runner saves its state there)."""
        caller = getattr(self.pm.hook, hook_name)
        try:
            caller(**kwargs)
        except UserError:
            if on_error is not None:
                on_error()
            raise
        except Exception as error:
            if on_error is not None:
                on_error()
            plugin = _raising_plugin(caller, error)
            raise PluginHookError(
                f"plugin {plugin!r} raised in {hook_name}: {type(error).__name__}: {error}",
                fix=f"fix or disable the plugin {plugin!r} (run with --debug for the traceback); "
                "the run state was saved, continue with --resume",
            ) from error

    def register_run_plugin(self, plugin: object, name: str) -> None:
        """Register a per-run plugin (a logger instance) and re-check the hooks."""
        try:
            self.pm.register(plugin, name=name)
            self.pm.check_pending()
        except pluggy.PluginValidationError as error:
            raise PluginError(f"plugin {name!r} is invalid: {error}", fix="check its hook names against `pyramidkd plugins`") from error


class PluginHookError(PluginError):
    """A plugin raised inside a lifecycle hook."""


def _raising_plugin(caller, error: BaseException) -> str:
    """The plugin whose hook implementation is on the exception's traceback."""
    codes = {}
    for impl in caller.get_hookimpls():
        function = getattr(impl.function, "__func__", impl.function)
        code = getattr(function, "__code__", None)
        if code is not None:
            codes[code] = impl.plugin_name
    traceback = error.__traceback__
    while traceback is not None:
        name = codes.get(traceback.tb_frame.f_code)
        if name is not None:
            return name
        traceback = traceback.tb_next
    return "unknown"


def build_registries(pm: pluggy.PluginManager) -> dict[str, Registry]:
    registries = {kind: Registry(kind) for kind in REGISTRATION_HOOKS}
    for kind, hook_name in REGISTRATION_HOOKS.items():
        caller = getattr(pm.hook, hook_name)
        # Each implementation is called on its own so that every component is
        # attributed to its plugin (pluggy's combined call loses that).
        for impl in reversed(caller.get_hookimpls()):
            try:
                provided = impl.function() or []
            except Exception as error:
                raise PluginError(
                    f"plugin {impl.plugin_name!r} raised in {hook_name}: {type(error).__name__}: {error}",
                    fix=f"fix or disable the plugin {impl.plugin_name!r}",
                ) from error
            for cls in provided:
                registries[kind].add(cls, impl.plugin_name)
    return registries
