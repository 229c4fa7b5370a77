"""mixtral-convert: Mixtral checkpoints to LLaMA2-Accessory's tensor-parallel layouts, streamed and checked."""

__version__ = "0.1.0"
