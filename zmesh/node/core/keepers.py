"""Who holds a restartable actor's creation besides its host, and who creates it again when the host dies. Pure.

A restartable (or detached) actor's creation (class, arguments, options) is held by
its host and by up to ``k`` *keepers*: the first ``k`` live members other than the
host in rendezvous order of the actor's id. The host chooses them and sends each
the creation, and chooses again when one dies or a member joins; the list travels
with the creation and in gossip, so every keeper knows its rank.

When the host dies, the first keeper of that list still alive creates the actor
again; the others wait and follow it through gossip. With ``k = 3``, any two nodes
lost together (the host and a keeper, or two keepers) leave a keeper that acts.

Two keepers may both act when their views of who is alive differ for a moment.
Their incarnations never collide: each keeper takes the next multiple of
``STRIDE`` plus its rank, so one copy always has the higher incarnation, and the
fencing rule (the higher incarnation is the actor; the other stops) leaves one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from zmesh.node.core.registry import ranked

DEFAULT_K = 3
# Incarnations of a re-creation by keepers: (restart number) * STRIDE + keeper rank, so two
# keepers acting at once never make two copies under one incarnation. Fits far below FINAL_INCARNATION.
STRIDE = 16


def keepers_of(actor_id: str, live: Iterable[str], host: str | None, k: int = DEFAULT_K) -> list[str]:
    """The first ``k`` live members other than ``host`` in rendezvous order of ``actor_id``."""
    return ranked(actor_id, [m for m in live if m != host])[:k]


def recreator(keepers: Sequence[str], live: Iterable[str]) -> str | None:
    """The keeper that creates the actor again after its host died: the first of the list still alive."""
    alive = set(live)
    return next((k for k in keepers if k in alive), None)


def next_incarnation(current: int, rank: int) -> int:
    """The incarnation a keeper of ``rank`` gives its re-creation: above ``current``, distinct per rank."""
    if not 0 <= rank < STRIDE:
        raise ValueError(f"a keeper rank must be in [0, {STRIDE}), got {rank}")
    return (current // STRIDE + 1) * STRIDE + rank
