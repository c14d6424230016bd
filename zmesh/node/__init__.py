"""The node daemon: placement, names, supervision of worker processes."""
