"""Experiment recipes (`recipes/*.toml`): read strictly, defaults filled in, `-s key=value`
overrides applied (CLI over recipe over defaults), then checked against the model cards."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Sequence

from kmismatch_lite.errors import KmmError
from kmismatch_lite.finetune import LoraSettings
from kmismatch_lite.plan import set_setting
from kmismatch_lite.toml_strict import check_keys, read_toml

ROOT = Path(__file__).resolve().parent.parent
# The checkout's recipes/ folder, or, installed from a wheel, the copy inside the package.
RECIPES_DIR = next((d for d in (ROOT / "recipes", Path(__file__).resolve().parent / "bundled_recipes")
                    if d.is_dir()), ROOT / "recipes")

_LORA = LoraSettings.types()
SCHEMA: dict[str, Any] = {
    "name": str,
    "description": str,
    "seed": int,
    "seeds": list,
    "models": {"student": str, "teacher": str},
    "data": {"dataset": str, "train": int, "test": int, "test_frac": float, "exemplars": int, "shots": int},
    "generate": {"backend": str, "options": dict},
    "finetune": {"backend": str, "verify": bool, "lora": _LORA},
    "evaluate": {"backend": str, "options": dict},
    "report": {"bootstrap": int},
    "design": {"doses": list, "categories": str, "slick_prompts": int, "slick_samples": int, "epochs": bool},
    "sweep": dict,
}
CATEGORY_MODES = ("", "cheap", "slick")
# Settings a grid cannot vary: seeds have their own key, and names say what the run is.
NOT_SWEPT = ("name", "description", "seed", "seeds", "sweep")
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
    # Off unless a recipe names doses, a categories mode or epochs; K and M as in PROTOCOL step 10.
    "design": {"doses": [], "categories": "", "slick_prompts": 4, "slick_samples": 4, "epochs": False},
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


def _schema_of(key: str, where: Any) -> Any:
    """The schema type of a dotted setting, or a KmmError naming the setting."""
    schema: Any = SCHEMA
    for part in key.split("."):
        if not isinstance(schema, dict) or part not in schema:
            raise KmmError(f"unknown setting '{key}' for recipe {where}")
        schema = schema[part]
    if isinstance(schema, dict):
        raise KmmError(f"setting '{key}' is a table; name one of its keys")
    return schema


def _items(text: str) -> list[str]:
    """The items of a list-valued setting: `0,1,2`, or as the recipe file writes it, `[0, 1, 2]`."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    return [v.strip() for v in text.split(",")]


def _parse_override(key: str, text: str, path: Path) -> Any:
    if key == "seeds":
        from kmismatch_lite.backends import coerce

        return [coerce(v, int, "seeds") for v in _items(text)]
    if key == "design.doses":
        from kmismatch_lite.backends import coerce

        return [coerce(v, float, "design.doses") for v in _items(text) if v]
    if key == "sweep":
        raise KmmError("name the setting to vary: sweep.SECTION.KEY=V1,V2,...")
    if key.startswith("sweep."):
        kind = _schema_of(key[len("sweep."):], path)
        return [_parse_value(v, kind) for v in _items(text)]
    return _parse_value(text, _schema_of(key, path))


def apply_overrides(raw: dict, overrides: Sequence[str], path: Path) -> dict:
    """`section.key=value` strings on top of the recipe, typed by the schema. `seeds=0,1,2` lists
    seeds and `sweep.SECTION.KEY=V1,V2` sets one grid axis; a plain setting replaces the recipe's
    grid axis on that key, and `seed` replaces `seeds` (and the other way round)."""
    out = copy.deepcopy(raw)
    for item in overrides:
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq:
            raise KmmError(f"bad setting '{item}': use section.key=value")
        if key != "sweep" and not key.startswith("sweep."):
            _schema_of(key, path)
        try:
            value = _parse_override(key, text, path)
        except KmmError as exc:
            raise KmmError(f"setting '{key}': {exc}") from None
        if key.startswith("sweep."):
            out.setdefault("sweep", {})[key[len("sweep."):]] = value
            continue
        set_setting(out, key, value)
        out.get("sweep", {}).pop(key, None)
        out.pop({"seed": "seeds", "seeds": "seed"}.get(key, ""), None)
    return out


def load(spec: str, overrides: Sequence[str] = ()) -> dict:
    """The resolved recipe: defaults < file < overrides, every key checked."""
    path = find(spec)
    raw = read_toml(path)
    check_keys(raw, SCHEMA, path)
    if "seed" in raw and "seeds" in raw:
        raise KmmError(f"{path}: set 'seed' or 'seeds', not both")
    raw = apply_overrides(raw, overrides, path)
    check_keys(raw, SCHEMA, path)
    recipe = _merge(DEFAULTS, raw)
    if "seeds" in recipe:
        del recipe["seed"]
    validate(recipe, path)
    recipe["recipe_file"] = str(path)
    return recipe


def validate(recipe: dict, path: Path | str) -> None:
    """Everything that can be checked without loading a model or a data set, for every cell."""
    _check_cell(recipe, str(path))
    if "seeds" in recipe:
        seeds = recipe["seeds"]
        if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
            raise KmmError(f"{path}: 'seeds' must be a non-empty list of integers >= 0, got {seeds!r}")
        if len(set(seeds)) != len(seeds):
            raise KmmError(f"{path}: 'seeds' lists a seed twice: {seeds!r}")
    for key, values in recipe.get("sweep", {}).items():
        _check_axis(recipe, key, values, str(path))


def _check_axis(recipe: dict, key: str, values: Any, where: str) -> None:
    """One grid axis: a known, sweepable setting and a list of distinct values, each valid."""
    if key in NOT_SWEPT:
        raise KmmError(f"{where}: sweep '{key}': this setting cannot be swept"
                       + (" (list seeds in 'seeds')" if key.startswith("seed") else ""))
    if key.split(".")[0] == "design":
        raise KmmError(f"{where}: sweep '{key}': design settings cannot be swept (they add conditions "
                       f"to every cell; list the doses in design.doses)")
    try:
        kind = _schema_of(key, where)
    except KmmError as exc:
        raise KmmError(f"{where}: sweep: {exc}") from None
    if kind is dict:
        raise KmmError(f"{where}: sweep '{key}': backend options cannot be swept")
    if not isinstance(values, list) or not values:
        raise KmmError(f"{where}: sweep '{key}' must be a non-empty list of values, got {values!r}")
    if any(values.count(v) > 1 for v in values):
        raise KmmError(f"{where}: sweep '{key}' lists a value twice: {values!r}")
    *parents, leaf = key.split(".")
    for value in values:
        check_keys({leaf: value}, {leaf: kind}, Path(f"{where}: sweep"), ".".join(parents))
        cell = {k: v for k, v in recipe.items() if k not in ("seeds", "sweep")}
        cell = copy.deepcopy(cell)
        set_setting(cell, key, value)
        _check_cell(cell, f"{where}: sweep {key}={value!r}")


def _check_cell(recipe: dict, where: str) -> None:
    from kmismatch_lite import backends, cards
    from kmismatch_lite.qa import data

    for role in ("student", "teacher"):
        spec = recipe["models"].get(role)
        if not spec:
            raise KmmError(f"{where}: missing key 'models.{role}'")
        if not (spec.endswith(".gguf") or spec.startswith("hf:") or cards.is_served(spec) or spec in cards.cards()):
            raise KmmError(f"{where}: models.{role}: unknown model '{spec}'")
        card = cards.cards().get(spec)
        if card is not None and card.prompt_style != "base":
            raise KmmError(f"{where}: models.{role}: card '{spec}' asks for {card.prompt_style} prompts, but kmm run "
                           f"prompts every model with the protocol's base prompt (prompt_style = \"base\")")
    kind, rest = data.parse_spec(recipe["data"]["dataset"])
    if kind not in ("geonames", "triviaqa", "popqa", "jsonl", "csv", "parquet"):
        raise KmmError(f"{where}: data.dataset: unknown data set '{recipe['data']['dataset']}'")
    for stage, registry in (("generate", backends.GENERATORS), ("evaluate", backends.GENERATORS),
                            ("finetune", backends.TRAINERS)):
        if recipe[stage]["backend"] not in registry:
            raise KmmError(f"{where}: {stage}.backend: unknown backend '{recipe[stage]['backend']}' "
                           f"(choose from {', '.join(registry)})")
    try:
        lora = LoraSettings.from_dict(recipe["finetune"]["lora"])
    except KmmError as exc:
        raise KmmError(f"{where}: {exc}") from None
    if lora.base_weights == "hub" and recipe["finetune"]["backend"] == "torch":
        raise KmmError(f"{where}: finetune.lora.base_weights = \"hub\" needs the unsloth or mlx backend "
                       f"(the torch backend trains on the student's GGUF weights)")
    for stage in ("generate", "evaluate"):
        _check_options(recipe, stage, where)
    d = recipe["data"]
    if d["train"] < 0 or d["test"] < 0 or not 0 < d["test_frac"] < 1 or d["shots"] < 0:
        raise KmmError(f"{where}: data sizes must be >= 0 and 0 < test_frac < 1")
    _check_doses(recipe["design"]["doses"], where)
    _check_categories(recipe["design"], d, where)
    _check_epochs(recipe, where)


def _check_options(recipe: dict, stage: str, where: str) -> None:
    """`[STAGE.options]` against what the stage's backend declares (and the openai backend's,
    which answers for a served model), before any stage runs."""
    from kmismatch_lite import backends, cards

    names = [recipe[stage]["backend"]]
    if any(cards.is_served(recipe["models"][role]) for role in ("student", "teacher")):
        names.append("openai")
    known: dict[str, type] = {}
    for name in names:
        known.update(backends.generator_options(name))
    for key, value in recipe[stage]["options"].items():
        try:
            backends.check_option(key, value, known, f"the {' or '.join(names)} backend")
        except KmmError as exc:
            raise KmmError(f"{where}: {stage}.options: {exc}") from None


def _check_doses(doses: list, where: str) -> None:
    """Off (empty), or at least two distinct numbers in [0, 1]: a slope needs two points."""
    from kmismatch_lite.designs.dose import check_doses

    if not doses:
        return
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in doses):
        raise KmmError(f"{where}: design.doses must be a list of numbers, got {doses!r}")
    try:
        check_doses(doses)
    except KmmError as exc:
        raise KmmError(f"{where}: design.doses: {exc}") from None
    if len(doses) < 2:
        raise KmmError(f"{where}: design.doses needs at least two doses for a dose-response slope, got {doses!r}")


def _check_categories(design: dict, d: dict, where: str) -> None:
    """The categories mode and SliCK's K greedy prompts and M sampled answers."""
    from math import comb

    mode, k, m = design["categories"], design["slick_prompts"], design["slick_samples"]
    if mode not in CATEGORY_MODES:
        raise KmmError(f"{where}: design.categories: unknown mode '{mode}' (choose from \"cheap\", \"slick\", "
                       f"or \"\" for none)")
    if k < 1 or m < 0:
        raise KmmError(f"{where}: design.slick_prompts must be >= 1 and design.slick_samples >= 0")
    if mode != "slick":
        return
    if k > 1 and (d["shots"] < 1 or comb(d["exemplars"], d["shots"]) < k):
        raise KmmError(f"{where}: design.slick_prompts = {k} needs {k} different sets of data.shots = "
                       f"{d['shots']} exemplars out of data.exemplars = {d['exemplars']}")


def _check_epochs(recipe: dict, where: str) -> None:
    """A curve over training length needs at least two epochs."""
    epochs = LoraSettings.from_dict(recipe["finetune"]["lora"]).epochs
    if recipe["design"]["epochs"] and epochs < 2:
        raise KmmError(f"{where}: design.epochs = true evaluates every epoch's adapter, but finetune.lora.epochs "
                       f"= {epochs}; set it to 2 or more")
