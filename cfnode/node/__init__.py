"""Live roles: stage peer, trainer, routing and stage choice."""
