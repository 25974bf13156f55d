"""Building the plugin host (:func:`make_plugin_host`): a fresh plugin manager per
run, the hook specifications, the plugins, and the component registries
(:mod:`~pyramidkd.engine.registries`).

Order of registration: built-in plugins first, then third-party plugins from the
``pyramidkd`` entry-point group (unless ``PYRAMIDKD_DISABLE_PLUGIN_AUTOLOAD`` is
set), then local modules a recipe names, then ``check_pending()`` so a misspelled
hook name is an error rather than silently never called.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
from typing import Iterable

import pluggy

from . import hookspecs
from .errors import PluginError
from .registries import PluginHost, PluginOrigin, build_registries

ENTRY_POINT_GROUP = "pyramidkd"
DISABLE_AUTOLOAD_ENV = "PYRAMIDKD_DISABLE_PLUGIN_AUTOLOAD"


def builtin_plugin_modules() -> list[str]:
    from pyramidkd.plugins import BUILTIN_PLUGINS

    # The command line's own commands come first: they register through the same
    # hook as a plugin package's (pyramidkd_register_commands).
    return ["pyramidkd.engine.commands.builtin", *BUILTIN_PLUGINS]


def _package_version() -> str:
    from pyramidkd._version import __version__

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
