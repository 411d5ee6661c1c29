"""Where training batches come from. Every source is a checkpointable iterator (`get_state`,
`set_state`) that yields, per step, this process's rows of the global batch:
`inputs, targets, positions, segment_ids`, each (rows, T) int32; segment id 0 marks padding.
The text pipeline is `maxgpt.data.pipeline`; `SyntheticSource` needs no data at all."""

from maxgpt.data.synthetic import SyntheticSource

__all__ = ["SyntheticSource"]
