"""clipsearch: self-hosted semantic photo search with CLIP."""

__version__ = "0.1.0"
