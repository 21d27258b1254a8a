"""Coordinator: membership, shard map, data leases, job and epoch driving."""
