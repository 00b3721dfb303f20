"""A tiny byte-level transformer (Llama's shape and tensor names) for the
example engine, the tests and the benchmarks.

    python -m torpor.examples.tinylm DIR [--layers 4 --hidden 256 --seed 0]

writes DIR/model.safetensors with properly initialised weights (unlike
`torpor.testing.make_checkpoint`, whose bytes are arbitrary), so forward
passes give finite, deterministic outputs. Its configuration is read back
from the tensors' shapes: nothing else needs to travel with the weights.
"""

from __future__ import annotations

import argparse
import math
import pathlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["TinyConfig", "TinyLM", "decode", "encode", "generate", "make_checkpoint"]

HEAD_DIM = 32
VOCAB = 256  # bytes


@dataclass(frozen=True)
class TinyConfig:
    layers: int = 4
    hidden: int = 256
    intermediate: int = 688
    vocab: int = VOCAB

    @property
    def heads(self) -> int:
        return self.hidden // HEAD_DIM

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> TinyConfig:
        vocab, hidden = state["model.embed_tokens.weight"].shape
        layers = sum(1 for name in state if name.endswith(".self_attn.q_proj.weight"))
        intermediate = state["model.layers.0.mlp.gate_proj.weight"].shape[0]
        return cls(layers, hidden, intermediate, vocab)


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)
        return (x32 * self.weight.float()).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, c: TinyConfig) -> None:
        super().__init__()
        self.heads = c.heads
        self.q_proj = nn.Linear(c.hidden, c.hidden, bias=False)
        self.k_proj = nn.Linear(c.hidden, c.hidden, bias=False)
        self.v_proj = nn.Linear(c.hidden, c.hidden, bias=False)
        self.o_proj = nn.Linear(c.hidden, c.hidden, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        b, t, h = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.heads, HEAD_DIM).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        q, k = _rotate(q, rope), _rotate(k, rope)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out: torch.Tensor = self.o_proj(y.transpose(1, 2).reshape(b, t, h))
        return out


class MLP(nn.Module):
    def __init__(self, c: TinyConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden, c.intermediate, bias=False)
        self.up_proj = nn.Linear(c.hidden, c.intermediate, bias=False)
        self.down_proj = nn.Linear(c.intermediate, c.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return out


class Block(nn.Module):
    def __init__(self, c: TinyConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden)
        self.mlp = MLP(c)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope)
        out: torch.Tensor = x + self.mlp(self.post_attention_layernorm(x))
        return out


class Body(nn.Module):
    def __init__(self, c: TinyConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab, c.hidden)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.norm = RMSNorm(c.hidden)


class TinyLM(nn.Module):
    def __init__(self, c: TinyConfig) -> None:
        super().__init__()
        self.config = c
        self.model = Body(c)
        self.lm_head = nn.Linear(c.hidden, c.vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits (batch, seq, vocab) for token ids (batch, seq)."""
        x = self.model.embed_tokens(ids)
        rope = _rope(ids.shape[1], x.device)
        for block in self.model.layers:
            x = block(x, rope)
        logits: torch.Tensor = self.lm_head(self.model.norm(x))
        return logits.float()


def _rope(t: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2, device=device).float() / HEAD_DIM))
    angles = torch.outer(torch.arange(t, device=device).float(), inv)
    return angles.cos(), angles.sin()


def _rotate(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    cos, sin = rope
    x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.to(x.dtype)


def encode(text: str) -> list[int]:
    return list(text.encode())


def decode(ids: list[int]) -> str:
    return bytes(ids).decode(errors="replace")


@torch.inference_mode()
def generate(model: TinyLM, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy decoding (no cache: the model is tiny, and it keeps this short)."""
    ids = list(prompt) or [0]
    for _ in range(max_tokens):
        logits = model(torch.tensor([ids]))[0, -1]
        ids.append(int(torch.argmax(logits)))
    return ids[len(prompt) or 1 :]


def make_checkpoint(
    directory: str | pathlib.Path,
    config: TinyConfig | None = None,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
) -> pathlib.Path:
    """Write a randomly initialised TinyLM to `directory`/model.safetensors."""
    from safetensors.torch import save_file

    c = config or TinyConfig()
    torch.manual_seed(seed)
    model = TinyLM(c)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]))
    out = pathlib.Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.safetensors"
    state = {name: t.to(dtype).contiguous() for name, t in model.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt"})
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    hidden = args.hidden
    config = TinyConfig(args.layers, hidden, (hidden * 8 // 3 + 15) // 16 * 16)
    print(make_checkpoint(args.directory, config, seed=args.seed))


if __name__ == "__main__":
    main()
