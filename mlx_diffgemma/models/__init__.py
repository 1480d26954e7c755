"""The network and its files: configs, the MLX model and its cache, checkpoints, loading, tokenizer, sizes, ranks."""
