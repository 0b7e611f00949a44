"""Host-only data building for the harness: corpora, split, tokenizer, manifest (never baked into an image)."""
