"""The pass registry: built-in passes (one module per pass in ``onnxopt.passes``) and plugins.

Plugins register a :class:`~onnxopt.pass_base.Pass` subclass under the entry-point group ``onnxopt.passes``::

    [project.entry-points."onnxopt.passes"]
    my-pass = "my_package.my_module:MyPass"

A registry is built on demand by :func:`load_registry`; nothing is registered by import side effects. Two passes with
one name are an error that names both sources.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from importlib import metadata

from onnxopt.errors import OptionsError, RegistryError
from onnxopt.pass_base import Pass

ENTRY_POINT_GROUP = "onnxopt.passes"


@dataclass(frozen=True)
class RegisteredPass:
    cls: type[Pass]
    source: str  # "builtin: onnxopt.passes.fold_bn" or "plugin: dist-name (module:attr)"


class Registry:
    """Name -> pass class, with where each came from."""

    def __init__(self) -> None:
        self._passes: dict[str, RegisteredPass] = {}

    def add(self, cls: type[Pass], source: str) -> None:
        if not (isinstance(cls, type) and issubclass(cls, Pass)):
            raise RegistryError(f"{source}: {cls!r} is not an onnxopt Pass subclass")
        name = cls.name
        if name in self._passes:
            raise RegistryError(
                f"duplicate pass name {name!r}: registered by {self._passes[name].source} and by {source}"
            )
        self._passes[name] = RegisteredPass(cls, source)

    def __contains__(self, name: str) -> bool:
        return name in self._passes

    def __iter__(self):
        return iter(sorted(self._passes))

    def names(self) -> list[str]:
        return sorted(self._passes)

    def get(self, name: str) -> type[Pass]:
        try:
            return self._passes[name].cls
        except KeyError:
            raise OptionsError(f"unknown pass {name!r}; available passes: {', '.join(self.names())}") from None

    def source(self, name: str) -> str:
        return self._passes[name].source

    def create(self, name: str, **options) -> Pass:
        return self.get(name)(**options)


def builtin_pass_classes() -> list[tuple[type[Pass], str]]:
    """Each module ``onnxopt/passes/<file>.py`` defines exactly one pass named ``<file>`` with ``_`` -> ``-``."""
    import onnxopt.passes as pkg

    found = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        classes = [
            obj for obj in vars(module).values()
            if isinstance(obj, type) and issubclass(obj, Pass) and obj.__module__ == module.__name__
            and not getattr(obj, "__abstractmethods__", None)
        ]
        expected = info.name.replace("_", "-")
        if len(classes) != 1 or classes[0].name != expected:
            raise RegistryError(
                f"built-in module {module.__name__} must define exactly one pass named {expected!r}, "
                f"found {[c.name for c in classes]}"
            )
        found.append((classes[0], f"builtin: {module.__name__}"))
    return found


def load_registry(*, plugins: bool = True) -> Registry:
    reg = Registry()
    for cls, source in builtin_pass_classes():
        reg.add(cls, source)
    if plugins:
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = getattr(ep, "dist", None)
            source = f"plugin: {dist.name if dist else '?'} ({ep.value})"
            try:
                cls = ep.load()
            except Exception as e:  # noqa: BLE001 - a broken plugin must not take the tool down silently
                raise RegistryError(f"{source}: cannot load entry point {ep.name!r}: {e}") from e
            if isinstance(cls, type) and issubclass(cls, Pass) and cls.name != ep.name:
                raise RegistryError(f"{source}: entry point {ep.name!r} names a pass called {cls.name!r}")
            reg.add(cls, source)
    return reg
