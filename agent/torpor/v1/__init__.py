"""Generated gRPC and protobuf code for torpor.v1 (scripts/genproto.py)."""
