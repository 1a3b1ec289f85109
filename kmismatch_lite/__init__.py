"""kmismatch_lite: the knowledge-mismatch experiment (generate, fine-tune, evaluate) on a laptop.

Importing the package is cheap: heavy libraries (llama_cpp, torch, transformers, mlx, unsloth)
are imported only inside the backend that needs them.
"""

__version__ = "0.1.0"

from kmismatch_lite.errors import KmmError

__all__ = ["KmmError", "__version__"]
