"""Worker processes: the zygote that forks them and the node's link to it."""
