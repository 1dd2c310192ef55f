"""Name → object registries, so that a config value selects code without if-chains.

A metric or a method is added as its module (which registers itself with ``@REGISTRY.register("name")``)
and its YAML (whose ``name`` field matches); one with options also registers its schema, in a
``config.py`` beside it, with ``speft_bench.schemas.register_schema`` (``speft_bench/config.py``).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A mapping from config names to objects, with errors that name the knob."""

    def __init__(self, knob: str, package: str | None = None):
        self.knob = knob  # e.g. "metric.name": used in error messages
        self._package = package  # imported lazily so that every module has registered
        self._entries: dict[str, T] = {}

    def register(self, *names: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            for name in names:
                if name in self._entries:
                    raise KeyError(f"{self.knob}: {name!r} registered twice")
                self._entries[name] = obj
            return obj

        return add

    def _discover(self) -> None:
        if self._package is not None:
            package, self._package = self._package, None
            import_submodules(package)

    def names(self) -> list[str]:
        self._discover()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        self._discover()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __getitem__(self, name: str) -> T:
        self._discover()
        if name not in self._entries:
            raise KeyError(f"{self.knob}={name!r} is not known; allowed values: {', '.join(self.names())}")
        return self._entries[name]


def import_submodules(package: str) -> None:
    """Import every module below ``package`` so that their ``register`` calls run."""
    pkg = importlib.import_module(package)
    for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{package}."):
        importlib.import_module(info.name)
