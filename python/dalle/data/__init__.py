"""Datasets for the thin DALL-E: the built-in captioned shapes and real image/caption folders."""
from .shapes import ShapesDataset, accuracy, matches, parse_caption, read_scene, render

__all__ = ["ShapesDataset", "render", "read_scene", "matches", "accuracy", "parse_caption"]
