"""The kinds of stage the designs share: the data split, a model answering one split's questions
(generation and evaluation, greedy or sampled, with or without an adapter) and a LoRA fine-tune on
one set. Each function returns a stage record (unit.py): its settings and needs for the plan, its
key inputs and work for the runner."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Callable

from kmismatch_lite import check
from kmismatch_lite.backends import cpu_threads
from kmismatch_lite.designs.unit import StageContext, StageRecord
from kmismatch_lite.errors import KmmError
from kmismatch_lite.fingerprint import stage_code
from kmismatch_lite.io import write_json, write_jsonl
from kmismatch_lite.qa import data, prompts
from kmismatch_lite.qa.question import Question
from kmismatch_lite.qa.sampling import GREEDY, Sampling

Template = Callable[[StageContext], prompts.PromptTemplate]
Adapter = Callable[[StageContext], tuple[Path, str]]


def questions(ctx: StageContext, split: str) -> list[Question]:
    """The `split` questions ("train", "test", "exemplars") of the cell's data stage."""
    return [Question(**r) for r in ctx.rows("data", f"{split}.jsonl")]


def few_shot(ctx: StageContext) -> prompts.PromptTemplate:
    """The run's own few-shot prompt, as its data stage wrote it."""
    return prompts.PromptTemplate(ctx.path("data", "prompt.txt").read_text(encoding="utf-8"))


def zero_shot(ctx: StageContext) -> prompts.PromptTemplate:
    return prompts.PromptTemplate()


def data_stage() -> StageRecord:
    """Protocol step 1: the split, the few-shot exemplars and the prompt."""
    def inputs(ctx: StageContext) -> dict:
        return {"data": ctx.settings.section("data"), "seed": ctx.settings.seed, "code": stage_code("data")}

    def work(ctx: StageContext, tmp: Path) -> None:
        d, seed = ctx.settings.data, ctx.settings.seed
        qs = data.load(d.dataset, seed=seed, test_frac=d.test_frac, n_exemplars=d.exemplars)
        train, test = qs.train[: d.train or None], qs.test[: d.test or None]
        if not train or not test:
            raise KmmError(f"data set '{d.dataset}' gives an empty train or test split")
        template = prompts.few_shot(qs.exemplars, k=d.shots, seed=seed)
        write_jsonl(tmp / "train.jsonl", [q.to_dict() for q in train])
        write_jsonl(tmp / "test.jsonl", [q.to_dict() for q in test])
        write_jsonl(tmp / "exemplars.jsonl", [q.to_dict() for q in qs.exemplars])
        (tmp / "prompt.txt").write_text(template.prefix, encoding="utf-8")

    return StageRecord("data", ("seed", "data"), (), inputs, work)


def answer_stage(name: str, role: str, split: str, template: Template, *, adapter: Adapter | None = None,
                 adapter_need: str | None = None, sampling: Sampling = GREEDY,
                 present: Callable[[StageContext], bool] | None = None) -> StageRecord:
    """A generate or evaluate stage: `role` answers the `split` questions, scored (steps 2, 6);
    greedily, or sampled as `sampling` says; with the adapter of the fine-tune `adapter_need`."""
    section_name = "generate" if name.startswith("generate/") else "evaluate"

    def inputs(ctx: StageContext) -> dict:
        backend = check.generation_backend(ctx.models[role].served, getattr(ctx.settings, section_name).backend)
        out = {"data": ctx.key("data"), "model": ctx.model_keys[role], "prompt": template(ctx).prefix,
               "backend": ctx.settings.section(section_name), "code": stage_code("answers", backend)}
        if section_name == "evaluate":
            out["adapter"] = adapter(ctx)[1] if adapter else None
        if not sampling.greedy:
            out["sampling"] = sampling.describe()
        return out

    def work(ctx: StageContext, tmp: Path) -> None:
        section = getattr(ctx.settings, section_name)
        options = dict(section.options)
        if ctx.models[role].served:
            # Outside the stage's temporary folder, so answers survive an interruption.
            cache = ctx.out / "cache" / f"{ctx.folder.replace('/', '-')}.jsonl"
            options = {"cache": str(cache), **options}
        res = check.evaluate(ctx.models[role], questions(ctx, split), template(ctx), backend=section.backend,
                             adapter=adapter(ctx)[0] if adapter else None, seed=ctx.settings.seed,
                             options=options, progress_factory=ctx.progress_factory,
                             label=f"{name.split('/')[1]} ({split})", sampling=sampling)
        write_jsonl(tmp / "samples.jsonl", res.samples)
        write_json(tmp / "metrics.json", res.metrics)

    needs = ("data",) + ((adapter_need,) if adapter_need else ())
    load = {"kind": "answer", "role": role, "split": split, "few_shot": template is not zero_shot}
    return StageRecord(name, (f"models.{role}", section_name), needs, inputs, work, present, load)


def finetuned_adapter(stage: str) -> Adapter:
    """The exported LoRA of fine-tune `stage`, keyed by that stage's key."""
    return lambda ctx: (ctx.path(stage, "adapter.gguf"), ctx.key(stage))


def finetune_stage(cond: str, sets: str, set_key: Callable[[StageContext, Path], dict]) -> StageRecord:
    """Protocol step 5 for one set (`sets`/`cond`.jsonl): a LoRA on the student, exported for
    llama.cpp. `set_key` gives what names the set in the key."""
    def set_file(ctx: StageContext) -> Path:
        return ctx.path(sets, f"{cond}.jsonl")

    def inputs(ctx: StageContext) -> dict:
        f = ctx.settings.finetune
        # Every resolved setting is in the key: a changed default retrains instead of reusing.
        # A CPU fine-tune's sums depend on how many threads share them: the count is in the key.
        threads = {"threads": cpu_threads()} if f.backend == "torch" else {}
        return {**set_key(ctx, set_file(ctx)), "student": ctx.model_keys["student"],
                "finetune": ctx.settings.section("finetune"), "lora": asdict(f.lora), **threads,
                "code": stage_code("finetune", f.backend)}

    def work(ctx: StageContext, tmp: Path) -> None:
        from kmismatch_lite.finetune import finetune

        f = ctx.settings.finetune
        finetune(ctx.settings.models.student, set_file(ctx), tmp, backend=f.backend, settings=f.lora,
                 verify=f.verify, progress_factory=ctx.progress_factory)

    return StageRecord(f"finetune/{cond}", ("models.student", "finetune"), (sets,), inputs, work,
                       load={"kind": "finetune", "role": "student", "set": sets})
