"""A hand-in file: one seed's result in one small self-contained JSON file, for `kmm pool`.

Every `kmm run` writes one beside each cell's report: the cell's resolved settings, the model
files' sha256, the data it was built from, the machine that ran it, the cell's results and every
condition's per-question verdicts. A sha256 over the body catches a file that was truncated,
corrupted in transit or edited by hand; it is a checksum, not a signature.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from kmismatch_lite.errors import KmmError
from kmismatch_lite.io import write_text

FORMAT = "kmismatch_lite hand-in"
VERSION = 1
# A hand-in's fields of a sample row: enough to pool (verdict) and to read back what was said.
SAMPLE_FIELDS = ("id", "verdict", "answer")
# Settings that name a run rather than define its experiment.
LABELS = ("name", "description", "seed")


def file_name(recipe_name: str, seed: int) -> str:
    """The hand-in's file name: the recipe and the seed, so a class's files never collide."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in recipe_name) or "run"
    return f"kmm-handin-{safe}-seed-{seed}.json"


def _canonical(body: dict) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def checksum(body: dict) -> str:
    """sha256 of the body's canonical JSON (sorted keys, no spaces, UTF-8)."""
    return hashlib.sha256(_canonical(body)).hexdigest()


def build(*, recipe: dict, point: dict, record: dict, results: dict, samples: dict[str, list[dict]],
          categories: dict | None = None) -> dict:
    """The body of one cell's hand-in. `record` holds the run's models, data, machine, packages
    and code revision (run.manifest's fields)."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "seed": recipe["seed"],
        "point": point,
        "recipe": recipe,
        "models": record["models"],
        "data": record["data"],
        "machine": record["machine"],
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "results": results,
        "samples": {cond: [{k: row[k] for k in SAMPLE_FIELDS if k in row} for row in rows]
                    for cond, rows in samples.items()},
        "categories": categories,
    }


def write(path: Path, body: dict) -> None:
    """Write a hand-in atomically: the checksum, then the body."""
    text = json.dumps({"sha256": checksum(body), "body": body}, ensure_ascii=False, separators=(",", ":"))
    write_text(path, text + "\n")


def read(path: str | Path) -> dict:
    """A hand-in's body, checked; a file that is not a whole, unedited hand-in is one KmmError."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise KmmError(f"{path} is not a kmm hand-in (not UTF-8 text)") from None
    except json.JSONDecodeError:
        raise KmmError(f"{path} is not a whole kmm hand-in (truncated or corrupt JSON)") from None
    if not isinstance(data, dict) or not isinstance(data.get("body"), dict) or "sha256" not in data:
        raise KmmError(f"{path} is not a kmm hand-in")
    body = data["body"]
    if body.get("format") != FORMAT:
        raise KmmError(f"{path} is not a kmm hand-in")
    if body.get("version") != VERSION:
        raise KmmError(f"{path} is a version {body.get('version')} hand-in; this kmm reads version {VERSION}")
    if checksum(body) != data["sha256"]:
        raise KmmError(f"{path} fails its checksum: the file was corrupted or edited after kmm wrote it")
    return body


def settings(body: dict) -> dict[str, Any]:
    """The experiment's resolved settings as dotted keys, without the seed and the run's name."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for k in sorted(node):
                walk(node[k], f"{prefix}{k}.")
        else:
            flat[prefix[:-1]] = node

    walk({k: v for k, v in body["recipe"].items() if k not in LABELS}, "")
    return flat


def from_folder(folder: Path) -> list[Path]:
    """The hand-ins a run folder holds: at its top (one seed, `seed = N`) or in its `seed-N/`
    cell folders (`seeds = [...]`)."""
    return sorted(folder.glob("kmm-handin-*.json")) + sorted(folder.glob("seed-*/**/kmm-handin-*.json"))
