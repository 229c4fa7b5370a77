"""One module per checkpoint format, each with a reader that returns a `checkpoint.Checkpoint`
and, where it is a target, a writer; `registry` finds the format of a directory.

Formats: `torrent` (and Mistral's consolidated.NN.pt, with `fused`), `mistral`
(mistral-inference folders and Mistral's .tar downloads, read in place through `tarball`),
`hf` (HF hub repositories; `hf_tokenizer` writes tokenizer.json), `accessory` (the base and
sparse layouts), `hub` (hf://org/name). File-level codecs: `torchzip` (torch's zip checkpoints,
with `zipcheck` proving a file whole before any tensor is mapped), `safetensorsfile` and
`stheader` (safetensors), `tokenizer` (the tokenizer beside a checkpoint)."""
