"""Scheduling strategies, importable from where Ray has them.

``scheduling_strategy="DEFAULT"`` places an actor on the caller's node when it
fits, else on the least loaded member that fits; ``"SPREAD"`` on the member
hosting the fewest actors; a ``NodeAffinitySchedulingStrategy`` on one node.
"""

from __future__ import annotations

from typing import Any

from zmesh.node.core.scheduler import AFFINITY, DEFAULT, SPREAD


class NodeAffinitySchedulingStrategy:
    """Place on ``node_id``; with ``soft=True`` fall back to any node when it is gone or can never fit."""

    def __init__(self, node_id: str, soft: bool, _spill_on_unavailable: bool = False, _fail_on_unavailable: bool = False) -> None:
        if not isinstance(node_id, str) or not node_id:
            raise ValueError(f"NodeAffinitySchedulingStrategy needs a node id (a str, as zmesh.nodes() lists), got {node_id!r}")
        self.node_id = node_id
        self.soft = bool(soft)
        self._spill_on_unavailable = _spill_on_unavailable
        self._fail_on_unavailable = _fail_on_unavailable

    def __repr__(self) -> str:
        return f"NodeAffinitySchedulingStrategy(node_id={self.node_id!r}, soft={self.soft})"


def to_wire(strategy: Any) -> Any:
    """The strategy as the node reads it; raises ValueError naming what is wrong."""
    if strategy is None or strategy == DEFAULT:
        return DEFAULT
    if strategy == SPREAD:
        return SPREAD
    if isinstance(strategy, NodeAffinitySchedulingStrategy):
        return [AFFINITY, strategy.node_id, strategy.soft]
    if isinstance(strategy, list) and len(strategy) == 3 and strategy[0] == AFFINITY:  # already in wire form (.options() over options)
        return [AFFINITY, str(strategy[1]), bool(strategy[2])]
    raise ValueError(f'scheduling_strategy must be "DEFAULT", "SPREAD" or a NodeAffinitySchedulingStrategy, got {strategy!r}')


__all__ = ["NodeAffinitySchedulingStrategy"]
