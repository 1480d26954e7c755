"""Images in: loading (Pillow) and the Gemma 4 image processor (NumPy only)."""
