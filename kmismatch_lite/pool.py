"""`kmm pool SOURCE... --out DIR`: seeds run on any machines, pooled into one answer.

A source is a run folder or a hand-in file (handin.py). Every hand-in must describe the same
experiment (the resolved settings apart from the seed, the model files, the data) and no seed may
come twice; otherwise nothing is written. The pooled folder holds what a many-seed `kmm run`
writes (results.json, report.md, forest.png, seed-N/), computed by the same report code from the
same verdicts, plus pool.json (the sources and their machines). `Watcher` re-pools
whenever a new hand-in lands in a shared folder.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from kmismatch_lite import handin, plan as planning
from kmismatch_lite.errors import KmmError
from kmismatch_lite.io import atomic_dir, write_json

MARKER = "pool.json"


@dataclass(frozen=True)
class HandIn:
    path: Path
    body: dict

    @property
    def seed(self) -> int:
        return self.body["seed"]


def gather(sources: list[Path]) -> list[HandIn]:
    """Every hand-in of the sources, read and checked (a run folder gives all of its own)."""
    found: list[HandIn] = []
    for src in map(Path, sources):
        if src.is_dir():
            files = handin.from_folder(src)
            if not files:
                raise KmmError(f"{src} holds no kmm hand-in file (a run folder from an older kmm writes one "
                               f"when the same kmm run is repeated on it; its stages are reused)")
        elif src.is_file():
            files = [src]
        else:
            raise KmmError(f"{src}: no such file or folder")
        found += [HandIn(f, handin.read(f)) for f in files]
    return found


def _show(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)


def difference(a: dict, b: dict) -> str | None:
    """The first way two hand-ins' experiments differ (a setting, a model file, the data), or None."""
    sa, sb = handin.settings(a), handin.settings(b)
    missing = object()
    for key in sorted(set(sa) | set(sb)):
        va, vb = sa.get(key, missing), sb.get(key, missing)
        if va != vb:
            return (f"setting {key} is {_show(va) if va is not missing else 'unset'} in the first and "
                    f"{_show(vb) if vb is not missing else 'unset'} in the second")
    for role in sorted(set(a["models"]) | set(b["models"])):
        ma, mb = a["models"].get(role) or {}, b["models"].get(role) or {}
        if ma.get("sha256") != mb.get("sha256"):
            return (f"the {role} model files differ ({ma.get('name')} sha256 {str(ma.get('sha256'))[:12]} "
                    f"against {mb.get('name')} sha256 {str(mb.get('sha256'))[:12]})")
    if a["data"] != b["data"]:
        da, db = a["data"], b["data"]
        return (f"the data differ ({da.get('spec')} from {da.get('source')} sha256 {str(da.get('sha256'))[:12]} "
                f"against {db.get('spec')} from {db.get('source')} sha256 {str(db.get('sha256'))[:12]})")
    return None


def conflict(accepted: list[HandIn], new: HandIn) -> str | None:
    """Why `new` cannot be pooled with the hand-ins already accepted, or None."""
    if new.body["point"]:
        return (f"{new.path} is one cell of a [sweep] run ({planning_label(new.body['point'])}); "
                f"kmm pool pools the seeds of one setting")
    for old in accepted:
        if old.seed == new.seed:
            return f"seed {new.seed} is in both {old.path} and {new.path}"
    if accepted:
        diff = difference(accepted[0].body, new.body)
        if diff:
            return f"{accepted[0].path} and {new.path} ran different experiments: {diff}"
    return None


def planning_label(point: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in point.items())


def check(handins: list[HandIn]) -> None:
    """Refuse (one KmmError) a set of hand-ins that cannot be pooled."""
    for i, h in enumerate(handins):
        problem = conflict(handins[:i], h)
        if problem:
            raise KmmError(problem)


def machine_label(m: dict) -> str:
    """A machine record in a few words: system, processor, cores, kmm version and revision."""
    system = str(m.get("platform") or "?").split("-")[0]
    kmm = (m.get("packages") or {}).get("kmismatch_lite") or "?"
    commit = f" {m['git_commit'][:7]}" if m.get("git_commit") else ""
    cpu = f", {m['cpu']}" if m.get("cpu") else ""
    return f"{system} {m.get('machine') or '?'}{cpu}, {m.get('cpus') or '?'} cores, kmm {kmm}{commit}"


def guard_out(out: Path) -> None:
    """Refuse to replace a folder that is not an earlier pool's output."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).is_file())):
        raise KmmError(f"{out} exists and is not a kmm pool folder: give a new folder for --out")


def write(handins: list[HandIn], out: Path) -> dict:
    """The pooled folder, written whole (atomically); returns its results.json content."""
    from kmismatch_lite import report, stats

    handins = sorted(handins, key=lambda h: h.seed)
    if len(handins) > 1:
        stats.require_pooling()
    cells, results = [], []
    with atomic_dir(out) as tmp:
        for h in handins:
            folder = f"seed-{h.seed}"
            report.write(tmp / folder, h.body["results"], h.body["samples"])
            if h.body.get("categories") is not None:
                write_json(tmp / folder / "categories.json", h.body["categories"])
            handin.write(tmp / folder / h.path.name, h.body)  # the body as checked, not the file re-read
            cells.append(planning.Cell(h.seed, {}, folder, h.body["recipe"], {}))
            results.append(h.body["results"])
        the_plan = planning.Plan(cells, [h.seed for h in handins], {}, True)
        machines = {h.seed: {**h.body["machine"], "label": machine_label(h.body["machine"])} for h in handins}
        res = report.write_pooled(tmp, the_plan, results, machines=machines)
        write_json(tmp / MARKER, {
            "sources": [{"file": str(h.path), "seed": h.seed, "machine": machines[h.seed]["label"]}
                        for h in handins],
            "machines": len({report.machine_key(h.body["machine"]) for h in handins}),
            "pooled": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })
    return res


def pool(sources: list[Path], out: Path) -> dict:
    """`kmm pool`: read and check every source, then write the pooled folder; nothing is written
    when a source is refused."""
    guard_out(out)
    handins = gather(sources)
    check(handins)
    return write(handins, out)


@dataclass
class Watcher:
    """Re-pools `folder`'s hand-ins into `out` whenever one arrives, changes or goes. A file that
    does not read as a whole hand-in (still being copied, or corrupt) is skipped until it changes;
    one that cannot be pooled with those accepted before it is skipped with its reason."""

    folder: Path
    out: Path
    log: Callable[[str], None] = print
    seen: dict[Path, tuple[int, int]] = field(default_factory=dict)
    accepted: dict[Path, HandIn] = field(default_factory=dict)
    results: dict | None = None

    def _candidates(self) -> list[Path]:
        out = self.out.resolve()
        return [p for p in sorted(self.folder.rglob("*.json"))
                if not p.name.startswith(".") and out not in p.resolve().parents]

    def poll(self) -> bool:
        """Look once; re-pool if the accepted hand-ins changed. Returns whether it re-pooled."""
        changed = False
        present = self._candidates()
        for gone in [p for p in self.accepted if p not in present]:
            del self.accepted[gone]
            self.log(f"gone: {gone.name}")
            changed = True
        for path in present:
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            sig = (st.st_size, st.st_mtime_ns)
            if self.seen.get(path) == sig:
                continue
            self.seen[path] = sig
            if self.accepted.pop(path, None) is not None:
                changed = True
            try:
                new = HandIn(path, handin.read(path))
            except KmmError as exc:
                self.log(f"not pooled yet: {exc}")
                continue
            problem = conflict(list(self.accepted.values()), new)
            if problem:
                self.log(f"skipped: {problem}")
                continue
            self.accepted[path] = new
            self.log(f"new hand-in: {path.name} (seed {new.seed})")
            changed = True
        if changed and self.accepted:
            self.results = write(list(self.accepted.values()), self.out)
        return changed

    def run(self, every: float) -> None:
        """Poll every `every` seconds until interrupted."""
        while True:
            self.poll()
            time.sleep(every)
