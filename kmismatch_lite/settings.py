"""One cell's settings, typed once: the resolved recipe of one seed and grid point as frozen
dataclasses, its fine-tune settings parsed once (the LoRA seed is the cell's seed unless the recipe
sets one; `[design] epochs` keeps every epoch's LoRA). The plan builds one per cell; the stages,
the designs and the manifest read it. `raw` is the same recipe as a dict, the form files record
(manifest, hand-in, stage keys)."""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

from kmismatch_lite.finetune import LoraSettings


@dataclass(frozen=True)
class Models:
    student: str
    teacher: str


@dataclass(frozen=True)
class Data:
    dataset: str
    train: int
    test: int
    test_frac: float
    exemplars: int
    shots: int


@dataclass(frozen=True)
class Answering:
    """`[generate]` or `[evaluate]`: the backend and its options."""

    backend: str
    options: Mapping[str, Any]


@dataclass(frozen=True)
class Finetune:
    backend: str
    verify: bool
    lora: LoraSettings


@dataclass(frozen=True)
class Design:
    doses: tuple[float, ...]
    categories: str
    slick_prompts: int
    slick_samples: int
    epochs: bool


@dataclass(frozen=True)
class CellSettings:
    name: str
    seed: int
    models: Models
    data: Data
    generate: Answering
    finetune: Finetune
    evaluate: Answering
    design: Design
    bootstrap: int
    raw: Mapping[str, Any]

    def section(self, name: str) -> dict:
        """A section of the resolved recipe as the dict a stage key records."""
        return self.raw[name]


def cell_lora(recipe: dict) -> LoraSettings:
    """A cell's resolved fine-tune settings from its recipe dict."""
    save = {"save_epochs": True} if recipe["design"]["epochs"] else {}
    return LoraSettings.from_dict({"seed": recipe["seed"], **recipe["finetune"]["lora"], **save})


def of(recipe: dict) -> CellSettings:
    """The typed settings of a cell's resolved recipe (one `seed`, no `seeds` or `[sweep]`)."""
    d, f, des = recipe["data"], recipe["finetune"], recipe["design"]
    return CellSettings(
        name=recipe["name"],
        seed=recipe["seed"],
        models=Models(recipe["models"]["student"], recipe["models"]["teacher"]),
        data=Data(d["dataset"], d["train"], d["test"], float(d["test_frac"]), d["exemplars"], d["shots"]),
        generate=Answering(recipe["generate"]["backend"], MappingProxyType(dict(recipe["generate"]["options"]))),
        finetune=Finetune(f["backend"], f["verify"], cell_lora(recipe)),
        evaluate=Answering(recipe["evaluate"]["backend"], MappingProxyType(dict(recipe["evaluate"]["options"]))),
        design=Design(tuple(float(x) for x in des["doses"]), des["categories"], des["slick_prompts"],
                      des["slick_samples"], bool(des["epochs"])),
        bootstrap=recipe["report"]["bootstrap"],
        raw=MappingProxyType(recipe),
    )
