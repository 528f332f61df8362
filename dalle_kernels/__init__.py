"""Custom GPU kernels for training DALL-E-style text-to-image transformers."""
from . import masks
from .masks import dense_mask
from .ops.attention import attention_ref, sparse_attention

__version__ = "0.1.0"

__all__ = ["masks", "dense_mask", "sparse_attention", "attention_ref"]
