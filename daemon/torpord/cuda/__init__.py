"""The CUDA building blocks the cuda backend (torpord.backends.cuda) is made
of, which know nothing of slabs or tiers: driver calls and events, the
pinned host pool, the kernels' loader, and NumPy models of the kernels that
run anywhere (torpord.cuda.reference)."""
