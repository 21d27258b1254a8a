"""Parameter server: holds fp32 shards and optimizer state, applies the update (SYNC barrier)."""
