"""Weights: the one ingest path (loader, adopt), the refitter, each rank's refit state."""
