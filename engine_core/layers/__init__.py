"""Shard-aware building blocks of the model (tensor parallelism lives here)."""
