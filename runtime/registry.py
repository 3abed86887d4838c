"""Named registries for backbones, heads, losses, backends and datasets.

Entries register with a decorator; a duplicate name is rejected, and a failed lookup names the
registry, the closest match and the valid keys (style.md, Registries).
"""
from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

from runtime.errors import BckdError

T = TypeVar("T")


def closest(name: str, choices: list[str] | tuple[str, ...]) -> str | None:
    """The closest of ``choices`` to ``name``, or None if nothing is close."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return match[0] if match else None


def unknown_name_message(kind: str, name: str, valid: list[str] | tuple[str, ...]) -> str:
    """'unknown <kind> 'x'; did you mean 'y'? valid: a, b, c'."""
    hint = closest(name, valid)
    did_you_mean = f"; did you mean '{hint}'?" if hint else ""
    return f"unknown {kind} '{name}'{did_you_mean} (valid: {', '.join(sorted(valid))})"


def check_known(keys, valid: list[str] | tuple[str, ...], what: str, where: str = "") -> None:
    """Raise 'unknown <what> 'x'<where>; did you mean 'y'? (valid: ...)' for the first unknown key."""
    for key in keys:
        if key not in valid:
            hint = closest(str(key), valid)
            did_you_mean = f"; did you mean '{hint}'?" if hint else ""
            raise BckdError(f"unknown {what} '{key}'{where}{did_you_mean} "
                            f"(valid: {', '.join(valid)})")


class Registry(Generic[T]):
    """A name -> object table filled by the ``register`` decorator."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering its target under ``name``; duplicates raise ValueError."""

        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        """The entry called ``name``; an unknown name is a user error naming the closest key."""
        if name not in self._items:
            raise BckdError(unknown_name_message(self.kind, name, list(self._items)))
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
