"""lmps: a parameter-server system for training Transformer language models over gRPC."""

__version__ = "0.1.0"
