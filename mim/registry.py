"""Named parts that grow: targets, tasks, model transforms. A part registers under a name with
`@REGISTRY.register("name")`; where a config key or a command takes a registered name it also
takes `package.module:Name`, imported on use, so a team's own part plugs in without a fork.

A registry is the one place where its names are dispatched: code elsewhere asks the part what it
does, never which name it has."""

from __future__ import annotations

import difflib
import importlib
import re
from collections.abc import Callable
from typing import Any

from mim.errors import UserInputError

_DOTTED = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


class UnknownPart(UserInputError):
    """A name that no registry holds, or a plug-in path that does not import."""


class Registry:
    def __init__(self, what: str, key: str, base: type | None = None) -> None:
        """`what`: what a part is ("target"); `key`: where users name one ("target.kind"); `base`:
        the class a part must subclass (None: any callable)."""
        self.what, self.key, self.base = what, key, base
        self._parts: dict[str, Any] = {}

    def register(self, name: str) -> Callable[[Any], Any]:
        def add(part: Any) -> Any:
            if name in self._parts and self._parts[name] is not part:
                raise ValueError(f"{self.what} {name!r} is registered twice")
            self._parts[name] = part
            part.registered_name = name
            return part

        return add

    def names(self) -> list[str]:
        return sorted(self._parts)

    def get(self, spec: str) -> Any:
        """The part registered as `spec`, or the object `package.module:Name` names."""
        if spec in self._parts:
            return self._parts[spec]
        if _DOTTED.match(spec):
            return self._plug_in(spec)
        close = difflib.get_close_matches(spec, self.names(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UnknownPart(
            f"{self.key}={spec!r}: no such {self.what}{hint} (registered: {', '.join(self.names())}; "
            f"or your own as package.module:Name)"
        )

    def _plug_in(self, spec: str) -> Any:
        module_name, _, attribute = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise UnknownPart(
                f"{self.key}={spec!r}: cannot import {module_name!r} ({error}); the module must be "
                "importable from this Python (installed, or on PYTHONPATH)"
            ) from None
        part: Any = module
        for name in attribute.split("."):
            part = getattr(part, name, None)
            if part is None:
                raise UnknownPart(f"{self.key}={spec!r}: {module_name} has no {attribute!r}")
        fits = isinstance(part, type) and issubclass(part, self.base) if self.base else callable(part)
        if not fits:
            expected = (
                f"a subclass of {self.base.__module__}.{self.base.__qualname__}"
                if self.base
                else "a function"
            )
            raise UnknownPart(f"{self.key}={spec!r} is not a {self.what}: expected {expected}, got {part!r}")
        if not getattr(part, "registered_name", None):
            part.registered_name = spec
        return part
