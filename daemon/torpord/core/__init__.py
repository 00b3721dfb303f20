"""The core: model registry, states and transitions. Imports neither gRPC nor CuPy."""
