"""Execution on the ranks: the typed rank client, TP worker processes, one rank's model runner."""
