"""The engine side: attach to a model and get its weights as tensors on the daemon's slabs.

`attach(model_id)` maps each slab read-only at an address reserved for it
(`torpor.agent.mapping`) and returns the model's handle (`AttachedModel`),
whose tensors are views on them. Its errors are `TorporError` (from the
daemon, or the agent's own: WEIGHTS_WITHDRAWN, LAYOUT_CHANGED, ...) and, for
a range that cannot be mapped, `MappingError`.

That, `torpor.agent.modules` (putting the tensors in a torch module),
`torpor.agent.publish` (publishing an engine's own final weights as an image
that later starts map) and `torpor.agent.hf_images` (a Hugging Face model of
any architecture on an image, found by `torpor.agent.hf_fingerprint`) are
what engines use. The modules with a leading underscore are the agent's
insides: the session with the daemon (`_session`, `_fdsocket`), the `use()`
and quiesce gate (`_gate`), and the layout mapped into this process
(`_layout`).
"""

from torpor.agent.attach import AttachedModel, attach, request_fds
from torpor.agent.mapping import MappingError, SlabRange, torch_dtype
from torpor.errors import TorporError

__all__ = [
    "AttachedModel",
    "MappingError",
    "SlabRange",
    "TorporError",
    "attach",
    "request_fds",
    "torch_dtype",
]
