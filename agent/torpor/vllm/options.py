"""What `model_loader_extra_config` may say to the torpor load format.

    LLM(model, load_format="torpor",
        model_loader_extra_config={"socket": "/run/torpor/torpor.sock"})
    vllm serve MODEL --load-format torpor \
        --model-loader-extra-config '{"socket": "/run/torpor/torpor.sock"}'

Every key is optional; an unknown key or a value of the wrong type is a
ValueError that names it (vLLM shows it as the engine's start failure), so
a typo never silently falls back to a default. No vLLM import here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["KEYS", "LoaderOptions"]

KEYS = {
    "socket": "torpord's Unix socket (default: $TORPOR_SOCKET, else torporctl's default)",
    "model_id": "the image's model id in the daemon (default: derived from the fingerprint)",
    "wait_s": "how long to wait for another engine publishing the same image (default 600)",
}


@dataclass(frozen=True)
class LoaderOptions:
    socket: str | None = None
    model_id: str | None = None
    wait_s: float = 600.0

    @classmethod
    def parse(cls, extra: Mapping[str, object] | None) -> LoaderOptions:
        """The options in `extra` (vLLM's model_loader_extra_config)."""
        if extra is None:
            return cls()
        if not isinstance(extra, Mapping):
            raise ValueError(
                "load_format='torpor': model_loader_extra_config must be a JSON object,"
                f" not {type(extra).__name__}"
            )
        unknown = sorted(str(k) for k in extra if k not in KEYS)
        if unknown:
            known = "; ".join(f"{k}: {what}" for k, what in KEYS.items())
            raise ValueError(
                f"load_format='torpor': unknown model_loader_extra_config key(s) {unknown}"
                f" (known: {known})"
            )
        socket = _text(extra, "socket")
        model_id = _text(extra, "model_id")
        wait_s = extra.get("wait_s", cls.wait_s)
        if (
            isinstance(wait_s, bool)
            or not isinstance(wait_s, int | float)
            or not math.isfinite(wait_s)
            or wait_s < 0
        ):
            raise ValueError(
                "load_format='torpor': model_loader_extra_config['wait_s'] must be a"
                " non-negative number of seconds"
            )
        return cls(socket=socket, model_id=model_id, wait_s=float(wait_s))


def _text(extra: Mapping[str, object], key: str) -> str | None:
    value = extra.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(
            f"load_format='torpor': model_loader_extra_config[{key!r}] must be a non-empty string"
        )
    return value
