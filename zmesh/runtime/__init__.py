"""The caller's side of zmesh: one Runtime per process, shared by the API and by workers."""

from __future__ import annotations

import os

from zmesh.runtime.core import Runtime

_current: Runtime | None = None


def current() -> Runtime | None:
    return _current


def set_current(runtime: Runtime | None) -> None:
    global _current
    _current = runtime


def _forget_in_forked_child() -> None:
    """A forked child has the parent's runtime without its I/O thread: drop it, so the child can init() anew."""
    global _current
    if _current is not None:
        _current.abandon_after_fork()
    _current = None


os.register_at_fork(after_in_child=_forget_in_forked_child)


__all__ = ["Runtime", "current", "set_current"]
