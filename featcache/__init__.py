"""featcache: extract CLIP features once, then adapt and evaluate few-shot methods in seconds."""

__version__ = "0.1.0"
