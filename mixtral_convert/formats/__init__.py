"""One module per checkpoint format, each with a reader that returns a `checkpoint.Checkpoint`
and, where it is a target, a writer; `registry` finds the format of a directory. File-level
codecs: `torchzip` (torch's zip checkpoints) and `safetensorsfile`."""
