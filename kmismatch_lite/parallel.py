"""`kmm run --jobs N`: a run's distinct stages at once, each as soon as the stages it needs are
done, in N worker processes on this machine or as Ray tasks on a local or existing Ray cluster.

A worker gets plain data (the recipe, the run folder, which cell and stage, the folders and keys
of the stages it needs, its thread count), rebuilds the plan and the stage's record from the
recipe, and runs the stage as `kmm run` does: under the stage's lock, reused where its key
matches (run.stage_once). The driver only schedules; each cell's report is written by the driver
once its stages are done. With the same thread count a stage computes what it computes in one
process, so `--jobs N` gives the same results as `--jobs 1`.
"""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Iterator

from kmismatch_lite import cards, plan as planning
from kmismatch_lite.backends import THREADS_ENV
from kmismatch_lite.errors import KmmError, stop_signal
from kmismatch_lite.stage_run import model_key, own_stages, stage_context, stage_once

# Resident memory of one worker on the classroom recipe's models (peak of a one-seed run, 1.98 GB,
# rounded up): `--jobs auto` runs no more workers than the free memory holds.
WORKER_GB = 2.5


def auto_jobs(cores: int | None = None, memory_gb: float | None = None) -> int:
    """Workers for `--jobs auto`: one per core (small models use a second thread poorly, so stages
    side by side on one thread each beat one stage on all of them), no more than memory holds."""
    cores = cores or os.cpu_count() or 1
    if memory_gb is None:
        memory_gb = _available_gb()
    by_memory = int(memory_gb // WORKER_GB) if memory_gb else cores
    return max(1, min(cores, by_memory))


def _available_gb() -> float | None:
    try:
        import psutil

        return psutil.virtual_memory().available / 2**30
    except ImportError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (AttributeError, ValueError, OSError):
        return None


def threads_for(jobs: int, cores: int | None = None) -> int:
    """Each worker's threads by default: the cores shared out among the workers."""
    return max(1, (cores or os.cpu_count() or 1) // jobs)


@contextmanager
def thread_setting(threads: int | None) -> Iterator[None]:
    """Every backend of this process computes on `threads` threads for the block (None: as it would)."""
    if threads is None:
        yield
        return
    before = os.environ.get(THREADS_ENV)
    os.environ[THREADS_ENV] = str(threads)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(THREADS_ENV, None)
        else:
            os.environ[THREADS_ENV] = before


# --- the worker side ---

@lru_cache(maxsize=4)
def _plan(recipe_json: str) -> planning.Plan:
    return planning.build(json.loads(recipe_json))


@lru_cache(maxsize=None)
def _model(spec: str) -> cards.Model:
    return cards.resolve(spec)


def work_stage(recipe_json: str, out: str, cell_index: int, name: str, needs: dict[str, tuple[str, str]],
               threads: int, cwd: str) -> tuple[str, str, bool, float] | None:
    """Run one stage (a worker's task): (folder, key, whether it ran, seconds), or None where the
    stage does not run (its input is absent). `cwd` is the driver's folder, where a recipe's
    relative paths (a data file) point."""
    os.environ[THREADS_ENV] = str(threads)
    if os.path.isdir(cwd):
        os.chdir(cwd)
    cell = _plan(recipe_json).cells[cell_index]
    models = {role: _model(cell.recipe["models"][role]) for role in ("student", "teacher")}
    keys = {role: model_key(m) for role, m in models.items()}
    done = {n: (Path(folder), key) for n, (folder, key) in needs.items()}
    ctx = stage_context(Path(out), cell, name, models, keys, done)
    if ctx is None:
        return None
    t0 = time.perf_counter()
    record = cell.stages[name].record
    folder, key, ran = stage_once(Path(out), cell.stages[name].folder, record.inputs(ctx),
                                  lambda tmp: record.work(ctx, tmp), log=lambda _: None)
    return str(folder), key, ran, time.perf_counter() - t0


# --- executors: submit a task, wait for the first to finish ---

class LocalExecutor:
    """Worker processes on this machine (spawned: a fresh interpreter, no inherited threads)."""

    def __init__(self, jobs: int) -> None:
        self.pool = ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"))

    def submit(self, args: tuple, gpu: bool) -> Future:
        return self.pool.submit(work_stage, *args)

    def wait_any(self, handles: list) -> list:
        done, _ = wait(handles, return_when=FIRST_COMPLETED)
        return list(done)

    def result(self, handle: Future):
        return handle.result()

    def stop(self, handles: list, ctrl_c: bool) -> None:
        """Interrupt the running stages as Ctrl-C would (they remove their temporaries). Ctrl-C
        itself reaches the workers, which share the terminal's process group; another signal
        (SIGTERM, SIGHUP) reached only this process and is passed on to them as Ctrl-C."""
        if ctrl_c:
            return
        for process in list(getattr(self.pool, "_processes", {}).values()):
            if process.is_alive():
                if os.name == "posix":
                    os.kill(process.pid, signal.SIGINT)
                else:
                    process.terminate()

    def close(self, cancel: bool) -> None:
        self.pool.shutdown(wait=True, cancel_futures=cancel)


class RayExecutor:
    """Ray tasks: on the cluster RAY_ADDRESS names, else on a local Ray instance started here.
    Each task asks for its threads as CPUs (and a GPU for a GPU fine-tune); the run folder must be
    on storage every node sees."""

    def __init__(self, jobs: int, threads: int) -> None:
        try:
            import ray
        except ImportError:
            raise KmmError("--executor ray needs Ray: pip install 'kmismatch_lite[ray]'") from None
        self.ray = ray
        self.started = not ray.is_initialized()
        if self.started:
            address = os.environ.get("RAY_ADDRESS")
            local = {} if address else {"num_cpus": jobs * threads}
            ours = signal.getsignal(signal.SIGTERM)
            ray.init(address=address or None, include_dashboard=False, log_to_driver=False, **local)
            if callable(ours):  # ray.init puts its own SIGTERM handler (an abrupt exit) over ours
                signal.signal(signal.SIGTERM, ours)
        self.task = ray.remote(work_stage)
        self.threads = threads

    def submit(self, args: tuple, gpu: bool):
        return self.task.options(num_cpus=self.threads, num_gpus=1 if gpu else 0).remote(*args)

    def wait_any(self, handles: list) -> list:
        done, _ = self.ray.wait(handles, num_returns=1)
        return done

    def result(self, handle):
        try:
            return self.ray.get(handle)
        except self.ray.exceptions.RayTaskError as exc:
            cause = exc.as_instanceof_cause()
            if isinstance(cause, KmmError):
                raise KmmError(str(cause).splitlines()[-1]) from None
            raise

    def stop(self, handles: list, ctrl_c: bool) -> None:
        """Cancel the running tasks (a KeyboardInterrupt in each: they may run on other nodes) and
        give them a minute to remove their temporaries before a local instance is shut down."""
        for handle in handles:
            self.ray.cancel(handle)
        if handles:
            self.ray.wait(handles, num_returns=len(handles), timeout=60)

    def close(self, cancel: bool) -> None:
        if self.started:
            self.ray.shutdown()


# --- the driver side ---

def _runnable(todo: dict, results: dict) -> bool:
    return any(f not in results and all(n in results for n in e.needs.values()) for f, e in todo.items())


@dataclass
class Entry:
    """One distinct stage of the plan: the first cell that declares it, its name there, and the
    folders of the stages it needs (by name)."""

    cell: int
    name: str
    needs: dict[str, str]
    gpu: bool


def entries(the_plan: planning.Plan) -> dict[str, Entry]:
    """Every distinct stage, by folder, in the order the cells first need them."""
    out: dict[str, Entry] = {}
    for i, cell in enumerate(the_plan.cells):
        for name in own_stages(cell):
            stage = cell.stages[name]
            gpu = name.startswith("finetune/") and cell.settings.finetune.backend == "unsloth"
            out.setdefault(stage.folder, Entry(i, name, dict(stage.needs), gpu))
    return out


def run_stages(recipe: dict, out: Path, the_plan: planning.Plan, *, jobs: int, threads: int, executor: str = "local",
               log: Callable[[str], None] = print, board=None) -> dict[str, tuple[Path, str, bool] | None]:
    """Every distinct stage of the plan, at most `jobs` at once, each on `threads` threads;
    returns, by stage folder, (folder, key, whether it ran) or None for a stage that did not run."""
    todo = entries(the_plan)
    recipe_json = json.dumps(recipe, sort_keys=True)
    results: dict[str, tuple[Path, str, bool] | None] = {}
    running: dict[Any, str] = {}
    pool = RayExecutor(jobs, threads) if executor == "ray" else LocalExecutor(jobs)
    ok = False
    try:
        while len(results) < len(todo):
            for folder, e in todo.items():
                if len(running) >= jobs:
                    break
                if folder in results or folder in running.values() or any(f not in results for f in e.needs.values()):
                    continue
                if any(results[f] is None for f in e.needs.values()):
                    results[folder] = None
                    continue
                needs = {n: (str(results[f][0]), results[f][1]) for n, f in e.needs.items()}
                args = (recipe_json, str(out.resolve()), e.cell, e.name, needs, threads, os.getcwd())
                running[pool.submit(args, e.gpu)] = folder
                if board:
                    board.start(folder)
            if not running:
                if not _runnable(todo, results):
                    raise RuntimeError("the plan has a stage whose needs never finish")
                continue
            for handle in pool.wait_any(list(running)):
                folder = running.pop(handle)
                got = pool.result(handle)
                results[folder] = None if got is None else (Path(got[0]), got[1], got[2])
                if got is not None:
                    log(f"stage {folder}: ran in {got[3]:.0f} s" if got[2] else f"stage {folder}: unchanged, reused")
                if board:
                    board.finish(folder)
        ok = True
    except KeyboardInterrupt as exc:
        pool.stop(list(running), ctrl_c=stop_signal(exc) is None)
        raise
    finally:
        pool.close(cancel=not ok)
    return results
