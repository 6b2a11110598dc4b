"""The trainer's side of training-serving alignment: ``PolicyModel`` (see docs/ALIGNMENT.md)."""
