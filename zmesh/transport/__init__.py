"""Sockets, framing, the wire protocol and serialization; knows nothing of actors."""
