"""QLoRA on one NVIDIA GPU with Unsloth. Only the loading is Unsloth's: the data, the loss on the
answer tokens, the training loop and the GGUF export are the torch backend's, shared.

Nothing heavy is imported until `train()` runs, and a missing extra or a missing CUDA GPU is one
clear line at construction time.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

from kmismatch_lite.cards import Model, hf_cache_file
from kmismatch_lite.errors import KmmError, missing_extra

SOURCES = ("auto", "gguf", "hub")


def require_gpu_stack() -> None:
    """The extra and a CUDA device, or a KmmError naming which is missing."""
    for package in ("unsloth", "torch"):
        if importlib.util.find_spec(package) is None:
            raise missing_extra(package, "unsloth")
    import torch

    if not torch.cuda.is_available():
        raise KmmError("the unsloth backend needs an NVIDIA GPU with CUDA, and torch sees none "
                       "(use --backend torch on a CPU, or --backend mlx on a Mac)")


def base_source(model: Model, source: str = "auto") -> str:
    """Where the 16-bit student comes from: the card's hub repo (when cached, or when asked for)
    or the student's own GGUF dequantized into a local folder, which is the llama.cpp base."""
    if source not in SOURCES:
        raise KmmError(f"unknown unsloth source '{source}' (choose from {', '.join(SOURCES)})")
    repo = model.card.hf_repo if model.card else None
    if source == "hub" or (source == "auto" and repo and hf_cache_file(repo, "config.json")):
        if not repo:
            raise KmmError(f"model '{model.name}' has no Hugging Face repo in its card")
        return repo
    from kmismatch_lite.formats.hf_from_gguf import hf_folder

    return str(hf_folder(model))


def load_unsloth(model: Model, settings, source: str = "auto"):
    """(peft model in 4-bit with the LoRA attached, tokenizer) through Unsloth."""
    import unsloth  # noqa: F401  (must come before transformers, which it patches)
    from unsloth import FastLanguageModel

    lm, tokenizer = FastLanguageModel.from_pretrained(
        model_name=base_source(model, source), max_seq_length=settings.max_length,
        load_in_4bit=True, dtype=None)
    peft_model = FastLanguageModel.get_peft_model(
        lm, r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules), bias="none",
        use_gradient_checkpointing="unsloth", random_state=settings.seed)
    return peft_model, tokenizer


class UnslothTrainer:
    """Unsloth loads the student in 4-bit and attaches the LoRA; the shared loop trains it.

    `loader(model, settings) -> (peft_model, tokenizer)` can be passed in, so everything here but
    the Unsloth call runs in CPU tests.
    """

    name = "unsloth"

    def __init__(self, model: Model, settings, *, loader: Callable | None = None, source: str | None = None,
                 device: str = "cuda"):
        source = source or getattr(settings, "base_weights", "gguf")
        if source not in SOURCES:
            raise KmmError(f"unknown unsloth source '{source}' (choose from {', '.join(SOURCES)})")
        if loader is None:
            require_gpu_stack()
            loader = lambda m, s: load_unsloth(m, s, source)  # noqa: E731
        self.model, self.settings, self.loader, self.device = model, settings, loader, device

    def train(self, examples: Sequence[dict], out_dir: Path, *, progress=None) -> dict[str, Any]:
        try:
            from kmismatch_lite.backends.torch_lora import fit
        except KmmError:
            raise missing_extra("peft", "unsloth") from None
        peft_model, tokenizer = self.loader(self.model, self.settings)
        return fit(peft_model, tokenizer, examples, self.settings, Path(out_dir), progress=progress,
                   device=self.device)


def greedy_answers(model: Model, adapter_dir: Path | None, prompts: Sequence[str], *,
                   max_tokens: int) -> list[str]:
    """The peft adapter's greedy answers (for `--verify`) from plain transformers + peft, in a
    fresh Python process on the GPU. This process imported Unsloth to train, and Unsloth patches
    the transformers model classes (fused kernels, rotary tables on CUDA): the check compares the
    GGUF export with the model it mirrors, the unpatched float32 one."""
    job = {"model": model.card.name if model.card else str(model.gguf_path),
           "adapter": str(adapter_dir) if adapter_dir is not None else None,
           "prompts": list(prompts), "max_tokens": max_tokens}
    with tempfile.TemporaryDirectory(prefix="kmm-verify-") as tmp:
        path = Path(tmp) / "job.json"
        path.write_text(json.dumps(job), encoding="utf-8")
        proc = subprocess.run([sys.executable, "-m", __name__, str(path)], capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
            raise KmmError(f"the transformers + peft answers for --verify failed: {last}")
        return json.loads(path.with_name("answers.json").read_text(encoding="utf-8"))


def _answer_job(path: Path) -> None:
    """Run one `greedy_answers` job file; the answers go beside it, in `answers.json`."""
    import torch

    from kmismatch_lite import cards
    from kmismatch_lite.backends.torch_lora import greedy_answers as torch_greedy

    job = json.loads(path.read_text(encoding="utf-8"))
    adapter = Path(job["adapter"]) if job["adapter"] else None
    answers = torch_greedy(cards.resolve(job["model"]), adapter, job["prompts"], max_tokens=job["max_tokens"],
                           device="cuda" if torch.cuda.is_available() else "cpu")
    path.with_name("answers.json").write_text(json.dumps(answers), encoding="utf-8")


if __name__ == "__main__":
    _answer_job(Path(sys.argv[1]))
