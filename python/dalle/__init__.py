"""The thin DALL-E model and trainer built on dalle_kernels."""
