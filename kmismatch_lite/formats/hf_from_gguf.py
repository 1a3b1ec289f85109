"""The student's GGUF as a standard Hugging Face folder (config, safetensors, tokenizer).

Fine-tuning must start from the weights the generator used, so the folder is built from the very
GGUF llama.cpp loads: transformers dequantizes it (and undoes llama.cpp's q/k row permutation for
llama). The folder is cached by the GGUF's hash, so the slow conversion runs once per file; the
MLX backend reuses it for mlx-lm.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from kmismatch_lite import cards
from kmismatch_lite.cards import Model, check_gguf
from kmismatch_lite.errors import KmmError, missing_extra
from kmismatch_lite.io import atomic_dir, sha256_file

CACHE = cards.CACHE / "hf"
DONE = "kmm_source.json"


gguf_sha256 = sha256_file  # computed once per process for an unchanged file


def hf_folder(model: Model) -> Path:
    """A transformers model folder holding `model`'s GGUF weights dequantized to float32."""
    if model.gguf_path is None:
        raise KmmError(f"model '{model.name}' is served over HTTP; fine-tuning needs its GGUF file")
    check_gguf(model.gguf_path)
    digest = gguf_sha256(model.gguf_path)
    folder = CACHE / digest[:16]
    if (folder / DONE).is_file():
        return folder
    with atomic_dir(folder) as tmp:
        _convert(model.gguf_path, tmp)
        (tmp / DONE).write_text(json.dumps({"gguf": str(model.gguf_path), "sha256": digest}, indent=2) + "\n",
                                encoding="utf-8")
    return folder


def _convert(gguf_path: Path, out: Path) -> None:
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise missing_extra("transformers", "torch") from None
    where, name = str(gguf_path.parent), gguf_path.name
    with _quiet_transformers():
        try:
            tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
            model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
        except (ValueError, KeyError, NotImplementedError) as exc:
            raise KmmError(f"transformers cannot convert {gguf_path} ({exc.__class__.__name__}: {exc})") from None
        # The saved folder holds plain float32 weights, not a GGUF-quantized model.
        for obj in (model.config, getattr(model, "generation_config", None)):
            if obj is not None and hasattr(obj, "quantization_config"):
                delattr(obj, "quantization_config")
        model.hf_quantizer = None
        model.config.name_or_path = str(gguf_path)
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers draws its own tqdm bar while dequantizing a GGUF (a few seconds, once per
    file) and logs warnings; neither would go through the project's display."""
    from transformers.utils import logging as hf_logging

    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        gguf_utils = None
    bar = getattr(gguf_utils, "tqdm", None)
    level, bars_on = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if bar is not None:
        gguf_utils.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar
        hf_logging.set_verbosity(level)
        if bars_on:
            hf_logging.enable_progress_bar()
