"""A simulated zmesh mesh for invariant checking: the real pure cores on a fake clock and a faulty network.

- ``network``: nodes running real Membership and Gossip cores, wired as ``zmesh/node/mesh/link.py`` wires
  them, and a network that delays, drops, duplicates and reorders; deaths, freezes, partitions, joins.
- ``actor_layer``: the actor protocol of ``zmesh/node/mesh/actors.py`` (names, placement, keepers, burial,
  fencing) modelled per node, every decision taken by a pure core.
- ``invariants``: what must hold once the mesh has converged, checked after every step.
"""
