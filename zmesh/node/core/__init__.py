"""Pure decisions of the node: membership, gossip, names, placement, lifecycle, resources. No I/O, no clock reads."""
