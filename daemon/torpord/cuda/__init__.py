"""What runs on NVIDIA GPUs: the kernels' sources and loaders, and NumPy
models of the kernels that run anywhere (torpord.cuda.reference)."""
