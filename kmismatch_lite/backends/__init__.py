"""The backend protocols and their lazy registry.

A generator answers a batch of prompts; a trainer fits a LoRA on `question -> target` pairs.
Backends are named by `"module:Class"` strings and imported only when used, so heavy libraries
(llama_cpp, torch, transformers, mlx, unsloth) stay out of `import kmismatch_lite`.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Callable, Protocol, Sequence

from kmismatch_lite.errors import KmmError
from kmismatch_lite.qa.sampling import GREEDY, Sampling

Progress = Callable[[int], None]
# `kmm run --threads T` (and each `--jobs` worker) sets it for every backend in the process.
THREADS_ENV = "KMM_THREADS"


def cpu_threads() -> int:
    """The threads a backend computes with: KMM_THREADS where set, else OMP_NUM_THREADS, else the
    cores this process may run on (taskset, cgroups)."""
    for name in (THREADS_ENV, "OMP_NUM_THREADS"):
        given = os.environ.get(name, "")
        if given.isdigit() and int(given) > 0:
            return int(given)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

GENERATORS = {
    "llamacpp": "kmismatch_lite.backends.llamacpp:LlamaCppGenerator",
    "mlx": "kmismatch_lite.backends.mlx:MlxGenerator",
    "openai": "kmismatch_lite.backends.openai:OpenAIGenerator",
}
TRAINERS = {
    "torch": "kmismatch_lite.backends.torch_lora:TorchTrainer",
    "mlx": "kmismatch_lite.backends.mlx:MlxTrainer",
    "unsloth": "kmismatch_lite.backends.unsloth:UnslothTrainer",
}


class Generator(Protocol):
    """Answers for a batch of prompts, cut at the stop strings, within a token cap: greedy, or
    sampled as `sampling` says (each prompt's answer reproducible from the sampling seed and the
    prompt alone, whatever the batch)."""

    name: str

    def generate(
        self, prompts: Sequence[str], *, max_tokens: int, stop: Sequence[str],
        progress: Progress | None = None, sampling: Sampling = GREEDY,
    ) -> list[str]: ...

    def info(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


class Trainer(Protocol):
    """Fits a LoRA adapter on the student and writes it (peft format and GGUF) into a folder."""

    name: str

    def train(self, examples: Sequence[dict], out_dir, *, progress=None) -> dict[str, Any]: ...


def common_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def answer_each(complete: Callable[[str, int, Sequence[str], Sampling], str], prompts: Sequence[str],
                max_tokens: int, stop: Sequence[str], progress: Progress | None = None,
                sampling: Sampling = GREEDY) -> list[str]:
    """One answer per prompt with `complete(prompt, max_tokens, stop, sampling)`, with progress."""
    outputs = []
    for prompt in prompts:
        outputs.append(complete(prompt, max_tokens, stop, sampling))
        if progress:
            progress(1)
    return outputs


def _load(registry: dict[str, str], name: str, what: str) -> type:
    if name not in registry:
        raise KmmError(f"unknown {what} backend '{name}' (choose from {', '.join(registry)})")
    module, _, cls = registry[name].partition(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as exc:
        raise KmmError(f"{what} backend '{name}' is not available: {exc}") from None


def generator_class(name: str) -> type:
    return _load(GENERATORS, name, "generation")


def trainer_class(name: str) -> type:
    return _load(TRAINERS, name, "fine-tune")


def generator_options(name: str) -> dict[str, type]:
    """The options a generation backend declares (its module's OPTIONS), by name and type."""
    return dict(getattr(importlib.import_module(generator_class(name).__module__), "OPTIONS", {}))


def check_option(key: str, value: Any, known: dict[str, type], where: str) -> None:
    """A recipe's backend option: a declared key with a value of the declared type."""
    if key not in known:
        raise KmmError(f"unknown option '{key}' for {where} (known: {', '.join(sorted(known))})")
    kind = known[key]
    ok = (isinstance(value, bool) if kind is bool
          else isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float
          else isinstance(value, kind) and not isinstance(value, bool) if kind is int
          else isinstance(value, kind))
    if not ok:
        raise KmmError(f"bad value for option '{key}' of {where}: {value!r} (expected {kind.__name__})")


def parse_options(pairs: Sequence[str], known: dict[str, type], where: str) -> dict[str, Any]:
    """`key=value` strings into typed settings; an unknown key is an error naming it."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not eq:
            raise KmmError(f"bad option '{pair}' for {where}: use key=value")
        if key not in known:
            raise KmmError(f"unknown option '{key}' for {where} (known: {', '.join(sorted(known))})")
        out[key] = coerce(value, known[key], key)
    return out


def coerce(value: str, kind: type, key: str) -> Any:
    try:
        if kind is bool:
            if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError
            return value.lower() in ("1", "true", "yes")
        if kind is list:
            return [v.strip() for v in value.split(",") if v.strip()]
        return kind(value)
    except ValueError:
        raise KmmError(f"bad value for '{key}': {value!r} (expected {kind.__name__})") from None
