"""Tiny Hugging Face models as a user writes them: random weights of small
configs (hidden 64, 2 layers, vocab 128) saved by transformers' own
`save_pretrained`, and what a module computes on a fixed input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers

IDS = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3]])
SMALL = {"vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 2}
ATTENTION = {"num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128}


def configs() -> dict[str, Any]:
    t = transformers
    return {
        "llama": t.LlamaConfig(**SMALL, **ATTENTION),
        "qwen2": t.Qwen2Config(**SMALL, **ATTENTION),
        "mistral": t.MistralConfig(**SMALL, **ATTENTION),
        "gpt2": t.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4),
        "gemma": t.GemmaConfig(**SMALL, **ATTENTION, head_dim=16),  # (tied)
        "gemma2": t.Gemma2Config(**SMALL, **ATTENTION, head_dim=16),
        "phi3": t.Phi3Config(**SMALL, **ATTENTION, pad_token_id=0),
        "opt": t.OPTConfig(**SMALL, ffn_dim=128, num_attention_heads=4, word_embed_proj_dim=64),
        "gpt_neox": t.GPTNeoXConfig(**SMALL, intermediate_size=128, num_attention_heads=4),
        "bert": t.BertConfig(**SMALL, intermediate_size=128, num_attention_heads=4),
        "mixtral": t.MixtralConfig(
            **SMALL, **ATTENTION, num_local_experts=4, num_experts_per_tok=2
        ),
        "qwen2_moe": t.Qwen2MoeConfig(
            **SMALL,
            **ATTENTION,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=64,
            shared_expert_intermediate_size=64,
        ),
        # Multi-head latent attention, a dense then a routed MoE layer, a
        # persistent buffer, and parameters transformers keeps in float32.
        "deepseek_v3": t.DeepseekV3Config(
            **SMALL,
            num_attention_heads=4,
            num_key_value_heads=4,
            intermediate_size=128,
            moe_intermediate_size=32,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=1,
            q_lora_rank=32,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
        ),
    }


def auto_class(config: Any) -> Any:
    encoder = config.model_type == "bert"
    return transformers.AutoModel if encoder else transformers.AutoModelForCausalLM


def save(
    path: Path, config: Any, dtype: torch.dtype = torch.bfloat16, *, shards: bool = True
) -> Path:
    """A random model of `config` (seeded) as `save_pretrained` writes it,
    in several shards unless `shards` is False."""
    torch.manual_seed(0)
    model = auto_class(config).from_config(config).to(dtype)
    model.save_pretrained(path, max_shard_size="40KB" if shards else "1GB")
    assert (len(list(path.glob("*.safetensors"))) > 1) == shards
    return path


def output(module: Any, encoder: bool) -> torch.Tensor:
    """The logits (an encoder's last hidden state) on IDS."""
    with torch.inference_mode():
        out = module(IDS)
    result: torch.Tensor = out.last_hidden_state if encoder else out.logits
    return result
