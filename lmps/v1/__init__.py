"""Generated protobuf and gRPC code for proto package ``lmps.v1`` (``make proto``).

Only ``lmps/codec.py`` and the transport modules (servicers and clients) import from here;
pure tensor, model, optimizer and sharding code never does.
"""
