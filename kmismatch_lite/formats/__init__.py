"""Weight formats and their converters: a LoRA exported to GGUF for llama.cpp, a GGUF read into a
Hugging Face model for the torch trainer, and GGUF to MLX for the mlx backend."""
