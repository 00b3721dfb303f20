"""Storage: strict safetensors parsing, source reads, and layer/slab planning."""

from torpord.storage.checkpoint import open_checkpoint
from torpord.storage.layers import (
    DEFAULT_LAYER_PATTERNS,
    MAX_LAYERS,
    CompiledLayerPatterns,
    LayerPatterns,
    LayerPlan,
    PackedTensor,
    compile_patterns,
    layout_hash,
    plan_layers,
)
from torpord.storage.reader import check_unchanged, read_tensors
from torpord.storage.safetensors import DTYPES, Checkpoint, SourceFile, TensorInfo

__all__ = [
    "DEFAULT_LAYER_PATTERNS",
    "DTYPES",
    "MAX_LAYERS",
    "Checkpoint",
    "CompiledLayerPatterns",
    "LayerPatterns",
    "LayerPlan",
    "PackedTensor",
    "SourceFile",
    "TensorInfo",
    "check_unchanged",
    "compile_patterns",
    "layout_hash",
    "open_checkpoint",
    "plan_layers",
    "read_tensors",
]
