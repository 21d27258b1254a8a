"""The pure ML core: model, update rule, slicer, data, settings, errors.

Nothing under `lmps.core` imports grpc or generated protobuf code (a test imports every
module here with grpc blocked). The RPC runtime (`lmps.rpc`) and the services build on it.
"""
