"""Conversion utilities: GGUF to Hugging Face folders, base models to CoMeT checkpoints."""
