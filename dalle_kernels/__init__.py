"""Custom GPU kernels for training DALL-E-style text-to-image transformers."""
from . import masks
from .masks import dense_mask
from .ops.attention import attention_ref, sparse_attention
from .ops.orthogonalize import orthogonalize, orthogonalize_list, orthogonalize_ref
from . import powersgd
from .ops.logit_laplace import logit_laplace_loss, logit_laplace_loss_ref, map_pixels, unmap_pixels

__version__ = "0.1.0"

__all__ = ["orthogonalize", "powersgd", "orthogonalize_list", "orthogonalize_ref", "logit_laplace_loss", "logit_laplace_loss_ref", "map_pixels", "unmap_pixels", "masks", "dense_mask", "sparse_attention", "attention_ref"]
