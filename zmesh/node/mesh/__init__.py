"""The I/O shell between nodes: the peer link, and actors across members."""
