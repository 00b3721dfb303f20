"""The gRPC boundary: thin servicers over the core, errors translated once."""
