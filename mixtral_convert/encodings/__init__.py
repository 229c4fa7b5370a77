"""Byte encodings, apart from what the bytes mean: torch's zip checkpoints (`torchzip`, with
`zipcheck` proving a file whole before a tensor is handed out), safetensors (`safetensors`: the
header parsed and checked, lazy reads, the streaming writer) and uncompressed tar members (`tar`).
Each says where a tensor's bytes lie and gives the exact size of what it would write."""
