"""Where other nodes might be: seeds, the run directory and mDNS, behind one interface."""
