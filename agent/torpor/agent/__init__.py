"""The engine side: slabs mapped at fixed addresses, weights as tensors on them.

`torpor.agent.mapping` holds the mapping primitives of the host backend. The
attach protocol that hands slabs from the daemon to engines builds on them.
"""

from torpor.agent.mapping import MappingError, SlabRange, torch_dtype

__all__ = ["MappingError", "SlabRange", "torch_dtype"]
