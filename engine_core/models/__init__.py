"""Model definitions and the architecture registry (``models.registry``)."""
