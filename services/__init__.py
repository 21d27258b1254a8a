"""The three lmps services, one package each, each runnable in its own process/container."""
