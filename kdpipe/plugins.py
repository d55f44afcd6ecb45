"""Plugins: packages that add KD methods, stage types, export formats or benchmark backends to kdpipe.

A plugin is any importable module that registers its objects when imported (``@METHODS.register(...)``,
``register_format(...)``, ...). kdpipe imports the plugins a distribution declares under the ``kdpipe.plugins``
entry-point group when ``kdpipe.stages`` is imported, so the CLI, validation and ``kdpipe schema`` see them::

    # the plugin's pyproject.toml
    [project.entry-points."kdpipe.plugins"]
    my_method = "my_package.my_method"

Objects registered later (from a notebook or a test, after ``import kdpipe``) are honoured too: the config models
are rebuilt from the registries whenever they change. A plugin that fails to import is reported and skipped, so a
broken add-on cannot take the built-in pipeline down with it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import pkgutil
from collections.abc import Iterable

log = logging.getLogger(__name__)

GROUP = "kdpipe.plugins"
_LOADED: dict[str, str] = {}
"""Entry-point name -> module, of the plugins imported so far."""
FAILED: dict[str, str] = {}
"""Entry-point name -> the error that stopped it (shown by ``kdpipe doctor``)."""


def import_all(package: str, path: Iterable[str]) -> list[str]:
    """Import every public module of ``package`` (its ``__path__``), in name order, so that a new method or stage
    file registers itself without being listed anywhere; returns their names. ``_private`` modules are skipped."""
    names = sorted(m.name for m in pkgutil.iter_modules(list(path)) if not m.name.startswith("_"))
    for name in names:
        importlib.import_module(f"{package}.{name}")
    return names


def load_plugins() -> dict[str, str]:
    """Import every ``kdpipe.plugins`` entry point not imported yet; return name -> module of those loaded."""
    for ep in importlib.metadata.entry_points(group=GROUP):
        if ep.name in _LOADED or ep.name in FAILED:
            continue
        try:
            ep.load()
        except Exception as exc:  # a broken plugin is reported, never fatal for kdpipe itself
            FAILED[ep.name] = f"{type(exc).__name__}: {exc}"
            log.warning(
                "kdpipe plugin %r (%s) failed to import and is skipped: %s; fix or uninstall the package that "
                "declares it",
                ep.name,
                ep.value,
                FAILED[ep.name],
            )
        else:
            _LOADED[ep.name] = ep.value
    return dict(_LOADED)
