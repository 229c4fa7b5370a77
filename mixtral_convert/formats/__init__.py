"""One module per checkpoint format, each with a reader that returns a `checkpoint.Checkpoint`
and, where it is a target, a writer; `registry` finds the format of a directory.

Formats: `torrent` (and Mistral's consolidated.NN.pt, with `fused`), `mistral`
(mistral-inference folders and Mistral's .tar downloads, read in place), `hf` (HF hub
repositories), `accessory` (the base and sparse layouts). The byte encodings they are stored in
(torch zip, safetensors, tar members) are in `encodings`, the tokenizers in `tokenizer`, and
hf://org/name's transport in `io.hub`."""
