"""The RPC runtime: the one codec, channels, the one server bootstrap, the request guard,
security, registration with the coordinator, and the shared service flags.

Only this package and the services' servicers touch grpc and the generated `lmps.v1` code.
"""
