"""A worker process: its main loop and the executors that run the calls it receives."""
