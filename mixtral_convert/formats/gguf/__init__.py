"""llama.cpp's GGUF files: `write` (the tensors, metadata and files of `merge --to gguf`), `target` (the
merge target, with `kquant` for llama.cpp's own quantizer), `source` (a GGUF read as a checkpoint),
`dequant` (when a quantized source may be written from), `per_expert` and `restack` (the old
per-expert layout and its restacking), `header` (the restack's own checked header parser)."""
