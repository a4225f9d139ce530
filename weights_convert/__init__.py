"""Read Versatile Diffusion checkpoints in every published layout and write them as our per-part folders."""

from weights_convert.checkpoint import ALL_PARTS, Checkpoint
from weights_convert.layouts import open_checkpoint
from weights_convert.tensorfile import CheckpointError, TensorFile

__all__ = ["ALL_PARTS", "Checkpoint", "open_checkpoint", "CheckpointError", "TensorFile"]
