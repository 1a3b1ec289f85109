"""Experiment recipes (`recipes/*.toml`): read strictly, defaults filled in, `-s key=value`
overrides applied (CLI over recipe over defaults), then checked against the model cards."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Sequence

from kmismatch_lite.errors import KmmError
from kmismatch_lite.finetune import LoraSettings
from kmismatch_lite.toml_strict import check_keys, read_toml

ROOT = Path(__file__).resolve().parent.parent
RECIPES_DIR = ROOT / "recipes"

_LORA = LoraSettings.types()
SCHEMA: dict[str, Any] = {
    "name": str,
    "description": str,
    "seed": int,
    "models": {"student": str, "teacher": str},
    "data": {"dataset": str, "train": int, "test": int, "test_frac": float, "exemplars": int, "shots": int},
    "generate": {"backend": str, "options": dict},
    "finetune": {"backend": str, "verify": bool, "lora": _LORA},
    "evaluate": {"backend": str, "options": dict},
    "report": {"bootstrap": int},
}
DEFAULTS: dict[str, Any] = {
    "name": "experiment",
    "description": "",
    "seed": 0,
    "models": {},
    "data": {"dataset": "geonames", "train": 0, "test": 0, "test_frac": 0.4, "exemplars": 16, "shots": 3},
    "generate": {"backend": "llamacpp", "options": {}},
    "finetune": {"backend": "torch", "verify": False, "lora": {}},
    "evaluate": {"backend": "llamacpp", "options": {}},
    "report": {"bootstrap": 2000},
}


def find(spec: str) -> Path:
    """A recipe path, or a bare name looked up in recipes/."""
    p = Path(spec)
    if p.suffix == ".toml" or p.exists():
        if not p.is_file():
            raise KmmError(f"recipe not found: {p}")
        return p
    named = RECIPES_DIR / f"{spec}.toml"
    if not named.is_file():
        known = ", ".join(sorted(x.stem for x in RECIPES_DIR.glob("*.toml")))
        raise KmmError(f"unknown recipe '{spec}' (known: {known}; or a path to a .toml file)")
    return named


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "options" else v
    return out


def _parse_value(text: str, kind: Any) -> Any:
    from kmismatch_lite.backends import coerce

    if kind is dict:
        raise KmmError("backend options are set in the recipe file, not with -s")
    if isinstance(kind, type):
        return coerce(text, kind, "value")
    return text


def apply_overrides(raw: dict, overrides: Sequence[str], path: Path) -> dict:
    """`section.key=value` strings on top of the recipe, typed by the schema."""
    out = copy.deepcopy(raw)
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq:
            raise KmmError(f"bad setting '{item}': use section.key=value")
        parts = key.strip().split(".")
        schema: Any = SCHEMA
        node = out
        for i, part in enumerate(parts):
            if not isinstance(schema, dict) or part not in schema:
                raise KmmError(f"unknown setting '{key}' for recipe {path}")
            schema = schema[part]
            if i < len(parts) - 1:
                node = node.setdefault(part, {})
        if isinstance(schema, dict):
            raise KmmError(f"setting '{key}' is a table; name one of its keys")
        try:
            node[parts[-1]] = _parse_value(value, schema)
        except KmmError as exc:
            raise KmmError(f"setting '{key}': {exc}") from None
    return out


def load(spec: str, overrides: Sequence[str] = ()) -> dict:
    """The resolved recipe: defaults < file < overrides, every key checked."""
    path = find(spec)
    raw = read_toml(path)
    check_keys(raw, SCHEMA, path)
    raw = apply_overrides(raw, overrides, path)
    check_keys(raw, SCHEMA, path)
    recipe = _merge(DEFAULTS, raw)
    validate(recipe, path)
    recipe["recipe_file"] = str(path)
    return recipe


def validate(recipe: dict, path: Path) -> None:
    """Everything that can be checked without loading a model or a data set."""
    from kmismatch_lite import backends, cards, data

    for role in ("student", "teacher"):
        spec = recipe["models"].get(role)
        if not spec:
            raise KmmError(f"{path}: missing key 'models.{role}'")
        if not (spec.endswith(".gguf") or spec.startswith("hf:") or cards.is_served(spec) or spec in cards.cards()):
            raise KmmError(f"{path}: models.{role}: unknown model '{spec}'")
    kind, rest = data.parse_spec(recipe["data"]["dataset"])
    if kind not in ("geonames", "triviaqa", "popqa", "jsonl", "csv", "parquet"):
        raise KmmError(f"{path}: data.dataset: unknown data set '{recipe['data']['dataset']}'")
    for stage, registry in (("generate", backends.GENERATORS), ("evaluate", backends.GENERATORS),
                            ("finetune", backends.TRAINERS)):
        if recipe[stage]["backend"] not in registry:
            raise KmmError(f"{path}: {stage}.backend: unknown backend '{recipe[stage]['backend']}' "
                           f"(choose from {', '.join(registry)})")
    LoraSettings.from_dict(recipe["finetune"]["lora"])
    d = recipe["data"]
    if d["train"] < 0 or d["test"] < 0 or not 0 < d["test_frac"] < 1 or d["shots"] < 0:
        raise KmmError(f"{path}: data sizes must be >= 0 and 0 < test_frac < 1")
