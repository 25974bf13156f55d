"""The plugin host: a fresh plugin manager per run and the component registries.

Order of registration: built-in plugins first, then third-party plugins from the
``pyramidkd`` entry-point group (unless ``PYRAMIDKD_DISABLE_PLUGIN_AUTOLOAD`` is
set), then local modules a recipe names, then ``check_pending()`` so a misspelled
hook name is an error rather than silently never called.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import os
import sys
from typing import Iterable

import attrs
import pluggy

from . import hookspecs
from .components import COMPONENT_KINDS
from .errors import PluginError, RecipeError, UserError

ENTRY_POINT_GROUP = "pyramidkd"
DISABLE_AUTOLOAD_ENV = "PYRAMIDKD_DISABLE_PLUGIN_AUTOLOAD"
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
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
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


def builtin_plugin_modules() -> list[str]:
    from pyramidkd.plugins import BUILTIN_PLUGINS

    # The command line's own commands come first: they register through the same
    # hook as a plugin package's (pyramidkd_register_commands).
    return ["pyramidkd.engine.commands.builtin", *BUILTIN_PLUGINS]


def _package_version() -> str:
    from pyramidkd import __version__

    return __version__


def make_plugin_host(
    local_modules: Iterable[str] = (),
    *,
    extra_plugins: Iterable[object] = (),
    load_entry_points: bool | None = None,
    local_search_path: str | None = None,
    recipe_file: str | None = None,
) -> PluginHost:
    """Build a fresh plugin manager and its registries.

    ``local_modules`` are module names a recipe lists under ``experiment.plugins``;
    ``local_search_path`` (the recipe's folder) is searched first for them.
    ``extra_plugins`` (objects or modules) are registered after them; tests and
    :mod:`pyramidkd.testing` use that.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    origins: dict[str, PluginOrigin] = {}
    version = _package_version()

    for module_name in builtin_plugin_modules():
        module = importlib.import_module(module_name)
        pm.register(module, name=module_name)
        origins[module_name] = PluginOrigin("builtin", "pyramidkd", version)

    if load_entry_points is None:
        load_entry_points = not os.environ.get(DISABLE_AUTOLOAD_ENV)
    if load_entry_points:
        _load_entry_points(pm, origins)

    for index, module_name in enumerate(local_modules):
        key = f"experiment.plugins[{index}]"
        module = _import_local(module_name, local_search_path, recipe_file, key)
        if pm.is_registered(module):
            continue
        _register(pm, module, module_name, f"local module {module_name!r}", recipe_file, key)
        origins[module_name] = PluginOrigin("local", getattr(module, "__file__", None) or module_name, "")

    for index, plugin in enumerate(extra_plugins):
        name = getattr(plugin, "__name__", None) or f"extra-plugin-{index}"
        _register(pm, plugin, name, f"plugin {name!r}", None, None)
        origins[name] = PluginOrigin("extra", name, "")

    try:
        pm.check_pending()
    except pluggy.PluginValidationError as error:
        raise PluginError(
            f"a plugin implements a hook that does not exist: {error}",
            fix="check the hook names against the list in README.md (they all start with 'pyramidkd_')",
        ) from error

    return PluginHost(pm, origins, build_registries(pm))


def _register(pm, plugin, name, what, file, key) -> None:
    try:
        pm.register(plugin, name=name)
    except ValueError as error:  # the same name registered twice
        raise PluginError(f"{what} is registered twice: {error}", file=file, key=key, fix="list it once") from error
    except pluggy.PluginValidationError as error:
        raise PluginError(f"{what} is invalid: {error}", file=file, key=key, fix="fix the hook implementation's signature") from error


def _load_entry_points(pm: pluggy.PluginManager, origins: dict[str, PluginOrigin]) -> None:
    seen: set[str] = set()
    for dist in importlib.metadata.distributions():
        for entry_point in dist.entry_points:
            if entry_point.group != ENTRY_POINT_GROUP or entry_point.name in seen:
                continue
            seen.add(entry_point.name)
            dist_name = dist.metadata["name"]
            if pm.get_plugin(entry_point.name) is not None or pm.is_blocked(entry_point.name):
                continue
            try:
                plugin = entry_point.load()
            except Exception as error:  # any import-time failure of third-party code
                raise PluginError(
                    f"cannot load plugin {entry_point.name!r} ({entry_point.value}) from distribution "
                    f"{dist_name} {dist.version}: {type(error).__name__}: {error}",
                    fix=f"fix or uninstall {dist_name}, or set {DISABLE_AUTOLOAD_ENV}=1 to skip third-party plugins",
                ) from error
            _register(pm, plugin, entry_point.name, f"plugin {entry_point.name!r} from {dist_name}", None, None)
            origins[entry_point.name] = PluginOrigin("entry-point", dist_name, dist.version)


def _import_local(module_name: str, search_path: str | None, file: str | None, key: str):
    added = False
    if search_path and search_path not in sys.path:
        sys.path.insert(0, search_path)
        added = True
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name.split(".")[0] and error.name != module_name:
            raise PluginError(
                f"local plugin module {module_name!r} failed to import: {error}", file=file, key=key,
                fix=f"install the missing module {error.name!r}",
            ) from error
        raise PluginError(
            f"local plugin module {module_name!r} not found (looked in the recipe's folder and sys.path)",
            file=file,
            key=key,
            fix=f"put {module_name}.py next to the recipe, or install it, or remove it from experiment.plugins",
        ) from error
    except Exception as error:
        raise PluginError(
            f"local plugin module {module_name!r} raised while importing: {type(error).__name__}: {error}",
            file=file,
            key=key,
            fix="fix the module (run it with `python -c 'import ...'` to see the traceback)",
        ) from error
    finally:
        if added:
            sys.path.remove(search_path)


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


def plugin_listing(host: PluginHost) -> list[dict]:
    """Every registered plugin with its origin and the components it provides."""
    provided: dict[str, dict[str, list[str]]] = {}
    for kind, registry in host.registries.items():
        for entry in registry:
            provided.setdefault(entry.plugin, {}).setdefault(kind, []).append(entry.cls.name)
    rows = []
    for name, plugin in host.pm.list_name_plugin():
        origin = host.origins.get(name, PluginOrigin("run", name, ""))
        rows.append(
            {
                "name": name,
                "source": origin.source,
                "distribution": origin.distribution,
                "version": origin.version,
                "components": {kind: sorted(names) for kind, names in sorted(provided.get(name, {}).items())},
                "hooks": sorted(impl.name for impl in host.pm.get_hookcallers(plugin) or []),
            }
        )
    return rows
