"""RL control: pausing, and releasing / resuming memory (engine side and rank side)."""
