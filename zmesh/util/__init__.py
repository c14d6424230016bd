"""Helpers importable where Ray has them (``zmesh.util.scheduling_strategies``)."""
