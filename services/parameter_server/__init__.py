"""Parameter server: shards and optimizer (store); when pushes become updates (consistency)."""
