"""One module per checkpoint format, each with a `checkpoint.Reader` that returns a
`checkpoint.Checkpoint` and, where it is a merge target, a `checkpoint.Target`; `registry` holds
both lists (READERS, TARGETS) and is the one place that finds the reader of a path.

Formats: `torrent` (and Mistral's consolidated.NN.pt, with `fused`), `mistral`
(mistral-inference folders, and Mistral's .tar downloads read in place), `hf` (HF hub
repositories), `accessory` (the base and sparse layouts). Two sub-packages:
`adapters` (what sits on a base: `accessory_peft`, Accessory's mixtral_peft saves; `hf`, `config`
and `summary`, HF PEFT LoRA adapters) and `gguf` (llama.cpp's files: `write` writes, `source`
reads, `kquant` and `target` make the merge target, `dequant` the --dequantize rule,
`per_expert`, `restack` and `header` the old per-expert layout). The byte encodings they are stored in
(torch zip, safetensors, tar members, GGUF) are in `encodings`, the tokenizers in `tokenizer`,
and hf://org/name's transport in `io.hub`."""
