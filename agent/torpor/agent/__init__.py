"""The engine side: attach to a model and get its weights as tensors on the daemon's slabs.

`attach(model_id)` maps each slab read-only at an address reserved for it
(`torpor.agent.mapping`) and returns tensors that are views on them.
"""

from torpor.agent.attach import AttachedModel, attach, request_fds
from torpor.agent.mapping import MappingError, SlabRange, torch_dtype

__all__ = ["AttachedModel", "MappingError", "SlabRange", "attach", "request_fds", "torch_dtype"]
