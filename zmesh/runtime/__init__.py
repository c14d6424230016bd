"""The caller's side of zmesh: one Runtime per process, shared by the API and by workers."""

from __future__ import annotations

from zmesh.runtime.core import Runtime

_current: Runtime | None = None


def current() -> Runtime | None:
    return _current


def set_current(runtime: Runtime | None) -> None:
    global _current
    _current = runtime


__all__ = ["Runtime", "current", "set_current"]
