"""Where training batches come from. Every source yields, per step, a global batch of
`inputs, targets, positions, segment_ids`, each (B, T) int32; segment id 0 marks padding."""

from maxgpt.data.synthetic import SyntheticSource

__all__ = ["SyntheticSource"]
