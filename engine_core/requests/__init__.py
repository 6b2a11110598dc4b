"""Requests: a generate call's arguments, validated requests, outputs (pure Python)."""
