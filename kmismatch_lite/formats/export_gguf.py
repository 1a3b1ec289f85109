"""A LoRA as a llama.cpp GGUF adapter, and the check that an adapter belongs to a base.

llama.cpp computes `W x + (alpha / rank) * B (A x)` with `lora_a` holding A [rank, in] and
`lora_b` holding B [out, rank] under the base tensor's GGUF name. For llama-architecture models,
llama.cpp's converter permutes the rows of the q and k projections (rotary halves interleaved), so
the rows of B for q and k get the same permutation here.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from kmismatch_lite.cards import Model, check_gguf
from kmismatch_lite.errors import KmmError, missing_extra
from kmismatch_lite.io import atomic_path

# Architectures whose converter applies LlamaModel.permute to q and k.
PERMUTED_ARCHS = {"llama"}
BASE_SHA_KEY = "kmm.base_sha256"


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k permutation of the rows of `w` (HF order -> GGUF order)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of `permute_rows` (GGUF order -> HF order)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def export_lora_gguf(lora: Mapping[str, tuple[np.ndarray, np.ndarray]], *, alpha: float,
                     base: Model, out_path: Path) -> Path:
    """Write `lora` ({HF module name: (A [rank, in], B [out, rank])}) as a llama.cpp adapter for `base`."""
    try:
        import gguf
    except ImportError:
        raise missing_extra("gguf", "torch") from None
    from kmismatch_lite.formats.hf_from_gguf import gguf_sha256

    if not lora:
        raise KmmError("the LoRA has no weights to export")
    check_gguf(base.gguf_path)
    meta = read_metadata(base.gguf_path)
    arch = meta["general.architecture"]
    n_blocks = meta[f"{arch}.block_count"]
    heads = {"q_proj": meta[f"{arch}.attention.head_count"],
             "k_proj": meta.get(f"{arch}.attention.head_count_kv", meta[f"{arch}.attention.head_count"])}
    names = gguf.get_tensor_name_map(_arch_enum(gguf, arch), n_blocks)
    writer_tensors = []
    for module, (a, b) in sorted(lora.items()):
        a, b = np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32)
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise KmmError(f"LoRA weights for {module} have shapes {a.shape} and {b.shape}; expected A [rank, in], B [out, rank]")
        gguf_name = names.get_name(module)
        if gguf_name is None:
            raise KmmError(f"no llama.cpp tensor for module '{module}' in a {arch} model")
        kind = module.rsplit(".", 1)[-1]
        if arch in PERMUTED_ARCHS and kind in heads:
            b = np.ascontiguousarray(permute_rows(b, heads[kind]))
        writer_tensors += [(f"{gguf_name}.weight.lora_a", a), (f"{gguf_name}.weight.lora_b", b)]
    with atomic_path(out_path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        writer.add_string(BASE_SHA_KEY, gguf_sha256(base.gguf_path))
        for name, array in writer_tensors:
            writer.add_tensor(name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return Path(out_path)


def _arch_enum(gguf, arch: str):
    for enum, name in gguf.MODEL_ARCH_NAMES.items():
        if name == arch:
            return enum
    raise KmmError(f"the gguf library does not know the architecture '{arch}'")


def check_adapter(adapter: Path, base: Model) -> None:
    """Refuse an adapter made for another base: a different architecture or base file hash."""
    from kmismatch_lite.formats.hf_from_gguf import gguf_sha256

    check_gguf(adapter, "adapter")
    meta = read_metadata(adapter)
    if meta.get("general.type") != "adapter":
        raise KmmError(f"{adapter} is not a LoRA adapter (general.type is {meta.get('general.type')!r})")
    arch = read_metadata(base.gguf_path).get("general.architecture")
    if meta.get("general.architecture") != arch:
        raise KmmError(f"adapter {adapter} is for a {meta.get('general.architecture')} model, "
                       f"but {base.name} is {arch}")
    want = meta.get(BASE_SHA_KEY)
    if want is not None and want != gguf_sha256(base.gguf_path):
        raise KmmError(f"adapter {adapter} was trained on another base file (sha256 {want[:16]}...), "
                       f"not {base.gguf_path.name}")


# GGUF value types: scalar struct formats by type id; 8 = string, 9 = array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def read_metadata(path: Path) -> dict[str, Any]:
    """The scalar and string key/values of a GGUF header (arrays skipped), without the gguf library."""
    try:
        return _read_header(path)
    except (struct.error, OverflowError, MemoryError):
        raise KmmError(f"{path}: truncated or corrupt GGUF header") from None


def _read_header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise KmmError(f"{path} is not a GGUF file")
        version, _n_tensors, n_kv = struct.unpack("<IQQ", f.read(20))
        if version < 2:
            raise KmmError(f"{path}: GGUF version {version} is too old")
        out: dict[str, Any] = {}
        for _ in range(n_kv):
            key = _read_str(f)
            kind = struct.unpack("<I", f.read(4))[0]
            value = _read_value(f, kind)
            if kind != 9:
                out[key] = value
        return out


def _read_str(f) -> str:
    (n,) = struct.unpack("<Q", f.read(8))
    return f.read(n).decode("utf-8", errors="replace")


def _read_value(f, kind: int):
    if kind == 8:
        return _read_str(f)
    if kind == 9:
        item, n = struct.unpack("<IQ", f.read(12))
        if item in _SCALARS:
            f.seek(n * struct.calcsize("<" + _SCALARS[item]), 1)
        else:
            for _ in range(n):
                _read_value(f, item)
        return None
    if kind not in _SCALARS:
        raise KmmError(f"unknown GGUF value type {kind}")
    fmt = "<" + _SCALARS[kind]
    return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]
