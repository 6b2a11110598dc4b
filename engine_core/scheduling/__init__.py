"""Scheduling: page pool, batching scheduler, step plans, the engine loop (pure Python)."""
