"""Protocol step 5: LoRA fine-tuning of the student on `question -> target` pairs.

`finetune()` trains with a registered trainer backend, writes `DIR/adapter/` (peft format),
`DIR/adapter.gguf` (a llama.cpp adapter for the student's GGUF) and `DIR/train_log.jsonl`, and can
check that llama.cpp with the adapter answers as the trained model does. With `save_epochs`, the
LoRA as it is at the end of each epoch N goes to `DIR/epochs/epoch-N/` in the same two forms.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence, get_type_hints

from kmismatch_lite import cards
from kmismatch_lite.backends import trainer_class
from kmismatch_lite.errors import KmmError
from kmismatch_lite.io import write_json, write_jsonl
from kmismatch_lite.lora_data import epoch_dir

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
COMPUTE = ("bfloat16", "mixed", "float32")
ATTENTION = ("eager", "sdpa")
SCHEDULES = ("constant", "linear")
# Where the fine-tune's base weights come from: the student's own GGUF (what llama.cpp evaluates), or
# the card's hub repository in the local Hugging Face cache (the unsloth and mlx backends).
BASE_WEIGHTS = ("gguf", "hub")


@dataclass
class LoraSettings:
    """LoRA hyper-parameters; the defaults suit the 135M student on a CPU."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(TARGET_MODULES))
    learning_rate: float = 1e-3
    epochs: int = 2
    batch_size: int = 8
    max_length: int = 64
    seed: int = 0
    # The frozen model in bfloat16 (the LoRA weights, their gradients and the optimizer stay
    # float32): on a 2-core AVX512-BF16 CPU the fastest of the three (bench/finetune_speed.py),
    # the exported adapter as faithful (--verify); "mixed" keeps a float32 residual stream and
    # runs only the matmuls in bfloat16; "float32" is the exact path.
    compute: str = "bfloat16"
    # The torch backend's attention: plain matmul and softmax, or torch's fused kernel ("sdpa",
    # transformers' default), whose backward pass is the slower on these short sequences on a CPU.
    attention: str = "eager"
    # A seeded share of the examples held out: the dev loss after each epoch picks the epoch whose
    # LoRA is kept, and `patience` epochs in a row without a lower dev loss stop training (0: never).
    dev_fraction: float = 0.0
    patience: int = 0
    # "linear" decays the rate to 0 over the planned steps, so the last batches move the LoRA little.
    lr_schedule: str = "constant"
    # The LoRA at the end of every epoch, beside the final one (epochs/epoch-N/). Each is that
    # epoch's own weights; with a dev split the final adapter is the best epoch's, so it equals
    # one of them, not necessarily the last.
    save_epochs: bool = False
    # The trainer's base weights (BASE_WEIGHTS): a setting, so in the fine-tune's key, never chosen
    # by what happens to be in a cache.
    base_weights: str = "gguf"

    @classmethod
    def types(cls) -> dict[str, type]:
        """Each setting's type, for `-o key=value` parsing."""
        hints = get_type_hints(cls)
        return {f.name: getattr(hints[f.name], "__origin__", hints[f.name]) for f in fields(cls)}

    @classmethod
    def from_dict(cls, d: dict) -> "LoraSettings":
        """Settings from a dict; an unknown key or a value of the wrong type is a KmmError."""
        known = cls.types()
        for key, value in d.items():
            if key not in known:
                raise KmmError(f"unknown fine-tune setting '{key}' (known: {', '.join(known)})")
            _check_type(key, value, known[key])
        settings = cls(**{k: (float(v) if known[k] is float else v) for k, v in d.items()})
        settings.validate()
        return settings

    def validate(self) -> None:
        bad = [("rank", self.rank >= 1), ("alpha", self.alpha > 0), ("dropout", 0 <= self.dropout < 1),
               ("learning_rate", self.learning_rate > 0), ("epochs", self.epochs >= 1),
               ("batch_size", self.batch_size >= 1), ("max_length", self.max_length >= 8),
               ("target_modules", bool(self.target_modules)), ("compute", self.compute in COMPUTE),
               ("attention", self.attention in ATTENTION),
               ("dev_fraction", 0 <= self.dev_fraction <= 0.5), ("patience", self.patience >= 0),
               ("lr_schedule", self.lr_schedule in SCHEDULES), ("base_weights", self.base_weights in BASE_WEIGHTS)]
        for key, ok in bad:
            if not ok:
                choices = {"compute": COMPUTE, "attention": ATTENTION, "lr_schedule": SCHEDULES,
                           "base_weights": BASE_WEIGHTS}.get(key)
                choices = f" (one of {', '.join(choices)})" if choices else ""
                raise KmmError(f"fine-tune setting '{key}' is out of range: {getattr(self, key)!r}{choices}")


def _check_type(key: str, value: Any, kind: type) -> None:
    if kind is list:
        ok = isinstance(value, list) and all(isinstance(v, str) and v for v in value)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        want = "a list of module names" if kind is list else kind.__name__
        raise KmmError(f"fine-tune setting '{key}' must be {want}, not {value!r}")


@dataclass
class FinetuneResult:
    """Where the outputs are and how the training went. `tokens_per_second`: real (non-padding)
    tokens through the training steps per second; `seconds`: the whole trainer call, loading
    included; `verify`: agreement rates from `verify_adapter` when asked for; `epochs`: the epochs
    whose LoRA was saved under epochs/ (none without `save_epochs`)."""

    adapter_dir: Path
    adapter_gguf: Path
    train_log: Path
    steps: int
    final_loss: float
    tokens_per_second: float
    seconds: float
    verify: dict | None
    epochs: list[int] = field(default_factory=list)


def read_examples(path: Path) -> list[dict]:
    """JSONL rows `{"question": ..., "target": ...}` (other keys kept); one error lists every bad line."""
    path = Path(path)
    if not path.is_file():
        raise KmmError(f"data file not found: {path}")
    rows, bad = [], []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    row = None
                if _is_example(row):
                    rows.append(row)
                else:
                    bad.append(number)
    except UnicodeDecodeError:
        raise KmmError(f"{path}: not a UTF-8 text file") from None
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise KmmError(f"{path}: line(s) {shown} are not JSON objects with non-empty string 'question' and 'target'")
    if not rows:
        raise KmmError(f"{path}: no examples (empty file)")
    return rows


def _is_example(row: Any) -> bool:
    return isinstance(row, dict) and all(isinstance(row.get(k), str) and row[k].strip() for k in ("question", "target"))


def finetune(student: str, examples: list[dict] | Path, out_dir: Path, *, backend: str = "torch",
             settings: LoraSettings | dict | None = None, verify: bool = False,
             progress_factory: Callable | None = None) -> FinetuneResult:
    """Fit a LoRA on the student and write adapter/, adapter.gguf and train_log.jsonl into `out_dir`
    (and epochs/epoch-N/ with `settings.save_epochs`).

    Everything is built in a temporary folder inside `out_dir` and moved into place only at the
    end, so a failure leaves no half-written output. `progress_factory(description, total)` is a
    context manager yielding `advance(n=1, **info)`.
    """
    settings = _settings(settings)
    if not isinstance(examples, list):
        examples = read_examples(Path(examples))
    elif not examples or not all(_is_example(e) for e in examples):
        raise KmmError("examples must be a non-empty list of {'question': str, 'target': str}")
    model = cards.resolve(student)
    if model.gguf_path is None:
        raise KmmError(f"model '{student}' is served over HTTP; fine-tuning needs its GGUF file")
    trainer = trainer_class(backend)(model, settings)
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".finetune.", dir=out_dir))
    try:
        result = _run(trainer, model, examples, settings, tmp, progress_factory)
        result.verify = verify_adapter(model, examples, tmp / "adapter", tmp / "adapter.gguf",
                                       backend) if verify else None
        if result.verify is not None:
            write_json(tmp / "verify.json", result.verify)
        _move_outputs(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if created and not any(out_dir.iterdir()):
            out_dir.rmdir()
    result.adapter_dir, result.adapter_gguf = out_dir / "adapter", out_dir / "adapter.gguf"
    result.train_log = out_dir / "train_log.jsonl"
    return result


def _settings(settings: LoraSettings | dict | None) -> LoraSettings:
    if settings is None:
        return LoraSettings()
    if isinstance(settings, dict):
        return LoraSettings.from_dict(settings)
    settings.validate()
    return settings


def _run(trainer, model: cards.Model, examples: list[dict], settings: LoraSettings, tmp: Path,
         progress_factory: Callable | None) -> FinetuneResult:
    from kmismatch_lite.formats.export_gguf import export_lora_gguf
    from kmismatch_lite.formats.hf_from_gguf import gguf_sha256
    from kmismatch_lite.lora_data import n_batches, n_dev

    n_train = len(examples) - n_dev(len(examples), settings.dev_fraction)
    total = settings.epochs * n_batches(n_train, settings.batch_size)
    t0 = time.perf_counter()
    with ExitStack() as stack:
        bar: list[Callable] = []

        def progress(n: int = 1, **info) -> None:
            # The bar opens at the first step: an error while loading leaves no half-drawn bar.
            if not bar:
                bar.append(stack.enter_context(progress_factory(f"fine-tuning {model.name} ({trainer.name})", total)))
            bar[0](n, **info)

        out = trainer.train(examples, tmp, progress=progress if progress_factory else None)
    seconds = time.perf_counter() - t0
    export_lora_gguf(out["lora"], alpha=settings.alpha, base=model, out_path=tmp / "adapter.gguf")
    write_jsonl(tmp / "train_log.jsonl", out["log"])
    about = {"student": model.name, "base_gguf": str(model.gguf_path), "base_sha256": gguf_sha256(model.gguf_path),
             "backend": trainer.name, "settings": asdict(settings), "examples": len(examples)}
    epochs = out.get("epoch_loras", {})
    for epoch, lora in epochs.items():
        folder = epoch_dir(tmp, epoch)
        export_lora_gguf(lora, alpha=settings.alpha, base=model, out_path=folder / "adapter.gguf")
        write_json(folder / "adapter" / "kmm_finetune.json", {**about, "epoch": epoch})
    info = {**about, **{k: v for k, v in out.items() if k not in ("lora", "log", "epoch_loras")},
            **({"saved_epochs": sorted(epochs)} if settings.save_epochs else {})}
    write_json(tmp / "adapter" / "kmm_finetune.json", info)
    return FinetuneResult(tmp / "adapter", tmp / "adapter.gguf", tmp / "train_log.jsonl", out["steps"],
                          out["final_loss"], out["tokens_per_second"], round(seconds, 3), None, sorted(epochs))


def _move_outputs(tmp: Path, out_dir: Path) -> None:
    names = ["train_log.jsonl", "verify.json", "adapter", "adapter.gguf", "epochs"]
    for name in names:
        target = out_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        if (tmp / name).exists():
            os.replace(tmp / name, target)
        elif target.exists():
            target.unlink()  # a verify.json from an earlier run would describe another adapter


def verify_prompts(examples: Sequence[dict], n_other: int = 16) -> tuple[list[str], list[str]]:
    """The trained questions and some held-out ones (built-in geonames test questions)."""
    from kmismatch_lite.qa import data

    trained = list(dict.fromkeys(e["question"] for e in examples))
    seen = set(trained)
    by_relation: dict[str, list[str]] = {}
    for q in data.load("geonames").test:
        if q.question not in seen:
            by_relation.setdefault(q.relation or "", []).append(q.question)
    # Round-robin over relations, so the held-out prompts are not all one kind of question.
    others = [q for group in zip(*by_relation.values()) for q in group][:n_other]
    return trained, others


def verify_adapter(model: cards.Model, examples: Sequence[dict], adapter_dir: Path, adapter_gguf: Path,
                   backend: str = "torch") -> dict:
    """Agreement of greedy answers: llama.cpp + GGUF adapter vs the training framework with its
    adapter (mlx-lm for mlx; transformers + peft for torch, on the GPU for unsloth), and vs the base."""
    import importlib

    from kmismatch_lite.qa import prompts
    from kmismatch_lite.backends import TRAINERS
    from kmismatch_lite.backends.llamacpp import LlamaCppGenerator

    module = importlib.import_module(TRAINERS[backend].partition(":")[0])
    greedy_answers = module.greedy_answers

    trained, others = verify_prompts(examples)
    rendered = [prompts.zero_shot(q) for q in trained + others]
    answers = {}
    for name, adapter in (("llamacpp_adapter", adapter_gguf), ("llamacpp_base", None)):
        gen = LlamaCppGenerator(model, adapter=adapter, parallel=1)   # llama.cpp's own one-at-a-time answers
        try:
            answers[name] = gen.generate(rendered, max_tokens=prompts.MAX_TOKENS, stop=prompts.STOP)
        finally:
            gen.close()
    answers["trainer_adapter"] = greedy_answers(model, adapter_dir, rendered, max_tokens=prompts.MAX_TOKENS)
    targets = {e["question"]: e["target"] for e in examples}
    n = len(trained)
    ad, ta, base = answers["llamacpp_adapter"], answers["trainer_adapter"], answers["llamacpp_base"]
    return {
        "trainer": module.__name__.rpartition(".")[2], "prompts": len(rendered), "trained": n,
        "others": len(others),
        "adapter_vs_trainer": _agree(ad, ta), "adapter_vs_trainer_trained": _agree(ad[:n], ta[:n]),
        "adapter_vs_trainer_others": _agree(ad[n:], ta[n:]),
        "adapter_vs_base": _agree(ad, base), "adapter_vs_base_trained": _agree(ad[:n], base[:n]),
        "adapter_gives_target": _agree(ad[:n], [prompts.clean_output(targets[q]) for q in trained]),
        "samples": [{"question": q, "trained": i < n, **{k: v[i] for k, v in answers.items()}}
                    for i, q in enumerate(trained + others)],
    }


def _agree(a: Sequence[str], b: Sequence[str]) -> float | None:
    return round(sum(x == y for x, y in zip(a, b)) / len(a), 4) if a else None
