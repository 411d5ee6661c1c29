"""The decoder stack: layers -> attention -> block -> transformer."""

from maxgpt.model.transformer import Block, Transformer

__all__ = ["Block", "Transformer"]
