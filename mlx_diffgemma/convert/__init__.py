"""Hugging Face weights to MLX directories: planning, streaming writes, safe publishing, verify."""
