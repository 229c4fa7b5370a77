"""The tokenizer beside a checkpoint: finding, checking and carrying it (`files`), and building an
HF tokenizer.json from a SentencePiece model (`hf`)."""
