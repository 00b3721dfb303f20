"""Writes tiny random checkpoints with transformers' own save_pretrained
(run by the vLLM environment's python): python make_models.py ROOT [NAME...]"""

import sys

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

COMMON = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,  # head_dim 32
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "max_position_embeddings": 512,
    # Wider than the default 0.02, so that greedy answers vary token by token.
    "initializer_range": 0.2,
}
SPECS = {
    "llama": (LlamaConfig, LlamaForCausalLM, {"tie_word_embeddings": False}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"tie_word_embeddings": True}),
    "mixtral": (
        MixtralConfig,
        MixtralForCausalLM,
        {"num_local_experts": 4, "num_experts_per_tok": 2},
    ),
}


def main() -> None:
    root = sys.argv[1]
    for name in sys.argv[2:] or list(SPECS):
        config_class, model_class, extra = SPECS[name]
        torch.manual_seed(0)
        config = config_class(**COMMON, **extra)
        config.dtype = torch.bfloat16
        model_class(config).to(torch.bfloat16).save_pretrained(f"{root}/{name}")


if __name__ == "__main__":
    main()
