"""The node's shared-memory object store: transfers between nodes and the service around the ledger (``core/store.py``)."""
