"""The `lmps` command-line client."""
