"""Model folders for MLX: a card's `mlx-community` repo from the local Hugging Face cache, or the
bundled GGUF converted offline (GGUF -> Hugging Face folder -> MLX folder), cached.

The conversion keeps every quantized 2-D weight quantized. Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 blocks,
and the 32-value sub-blocks of Q4_K and Q5_K, are affine groups of 32 values, as MLX's are: those
weights keep the GGUF's own levels, scales and offsets (4, 5 or 8 bits, group size 32), so MLX
computes with exactly the weights llama.cpp uses. The other quantized types (Q6_K, Q3_K, Q2_K,
the IQ types) have no MLX equivalent: they are requantized from their dequantized values to MLX's
affine 8-bit in groups of 32, close to the GGUF's weights but not bit-identical to them (on the
bundled Gemma's Q6_K weights: 0.5% relative RMS error; 4-bit groups of 64 gave 10% and changed
over half of 40 greedy answers). kmm_source.json in the folder records which weights were kept
and which requantized. Fine-tuning on either is QLoRA. Float weights stay float.
mlx and mlx_lm are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Sequence

from kmismatch_lite import cards
from kmismatch_lite.errors import KmmError, missing_extra
from kmismatch_lite.io import atomic_dir

CACHE = cards.CACHE / "mlx"
SOURCES = ("auto", "gguf", "hub")
# Part of the converted folder's cache key: a change to what the conversion writes gets a new folder.
CONVERSION = 2
# GGML types made of affine groups of 32 values (value = scale * level + bias), as MLX's are: bits.
EXACT_BITS = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8, "Q4_K": 4, "Q5_K": 5}
FLOAT_TYPES = ("F32", "F16", "BF16", "F64")
# Every other quantized type (Q6_K, Q3_K, Q2_K, the IQ types) is requantized to MLX affine 8-bit in
# groups of 32 (module docstring: 4-bit in groups of 64 moved the answers).
REQUANT_BITS, REQUANT_GROUP = 8, 32
REQUANTIZED_TO = (f"MLX affine {REQUANT_BITS}-bit, group size {REQUANT_GROUP}, requantized from the "
                  "GGUF's dequantized values (close to the GGUF's weights, not bit-identical to them)")
# llama.cpp tensor names -> Hugging Face module paths (layer N is `blk.N.` / `model.layers.N.`).
_HF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj", "token_embd": "model.embed_tokens", "output": "lm_head"}


def require_mlx() -> None:
    import importlib

    try:
        importlib.import_module("mlx.core")
        importlib.import_module("mlx_lm")
    except ImportError:
        raise missing_extra("mlx-lm", "mlx") from None


def model_dir(model: cards.Model, source: str = "auto") -> Path:
    """The MLX folder for `model`: `hub` is the card's MLX repo (local HF cache only), `gguf` the
    converted bundled GGUF, `auto` the GGUF when there is one (the weights llama.cpp uses)."""
    if source not in SOURCES:
        raise KmmError(f"unknown MLX model source '{source}' (choose from {', '.join(SOURCES)})")
    if source == "hub" or (source == "auto" and model.gguf_path is None):
        return hub_dir(model)
    if model.gguf_path is None:
        raise KmmError(f"model '{model.name}' has no GGUF file to convert for MLX")
    return converted_dir(model)


def hub_dir(model: cards.Model) -> Path:
    repo = model.card.mlx_repo if model.card else None
    if not repo:
        raise KmmError(f"model '{model.name}' names no MLX repo in its card; use source=gguf")
    found = cards.hf_cache_file(repo, "config.json")
    if found is None:
        raise KmmError(f"MLX model {repo} is not in the local Hugging Face cache: download it "
                       f"(needs internet) with `hf download {repo}`, or use source=gguf")
    return found.parent


def cache_key(model: cards.Model) -> str:
    from kmismatch_lite.formats.hf_from_gguf import gguf_sha256

    return f"{model.name}-{gguf_sha256(Path(model.gguf_path))[:16]}-c{CONVERSION}"


def converted_dir(model: cards.Model) -> Path:
    """Convert the model's GGUF once into CACHE/<key>/ (written atomically) and return it."""
    dest = CACHE / cache_key(model)
    if (dest / "config.json").is_file():
        return dest
    from kmismatch_lite.formats.hf_from_gguf import hf_folder

    convert_folder(hf_folder(model), dest, gguf_path=Path(model.gguf_path))
    return dest


def hf_path(gguf_name: str) -> str | None:
    """`blk.3.attn_q` -> `model.layers.3.self_attn.q_proj`; None for a name not in the table."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in _HF_NAMES:
        return f"model.layers.{parts[1]}.{_HF_NAMES[parts[2]]}"
    return _HF_NAMES.get(gguf_name) if len(parts) == 1 and gguf_name in ("token_embd", "output") else None


def gguf_layout(gguf_path: Path) -> dict[str, dict] | None:
    """{HF module path: how MLX holds it} for each quantized 2-D weight of the GGUF: its GGML type,
    `bits` and `group_size`, and `exact` (the GGUF's own blocks) or not (requantized). A weight
    whose rows do not split into groups stays float (left out). None when a quantized weight has
    a name outside the table: the model then stays float."""
    from gguf import GGUFReader

    layout = {}
    for t in GGUFReader(str(gguf_path)).tensors:
        kind = t.tensor_type.name
        if len(t.shape) != 2 or kind in FLOAT_TYPES:
            continue
        path = hf_path(t.name.removesuffix(".weight"))
        if path is None:
            return None
        cols = int(t.shape[0])          # GGUF shapes list the row length first
        if kind in EXACT_BITS:
            layout[path] = {"gguf_type": kind, "bits": EXACT_BITS[kind], "group_size": 32, "exact": True}
        elif cols % 32 == 0:
            group = REQUANT_GROUP if cols % REQUANT_GROUP == 0 else 32
            layout[path] = {"gguf_type": kind, "bits": REQUANT_BITS, "group_size": group, "exact": False}
    return layout


def block_levels(blocks, kind: str):
    """(levels [n, 32] uint8, scales [n], biases [n] float32) of the `n` affine 32-value groups in
    GGUF blocks of `kind` (rows of raw bytes), such that value = scale * level + bias, exactly as
    llama.cpp dequantizes them. A Q4_K or Q5_K block holds 8 such groups under one scale pair."""
    import numpy as np

    def half(b):
        return np.ascontiguousarray(b).view(np.float16)[:, 0].astype(np.float32)

    d, rest = half(blocks[:, :2]), blocks[:, 2:]
    if kind in ("Q4_K", "Q5_K"):
        from gguf.quants import Q4_K

        dmin, (sc, m) = half(rest[:, :2]), Q4_K.get_scale_min(np.ascontiguousarray(rest[:, 2:14]))
        rest = rest[:, 14:]
        high = None
        if kind == "Q5_K":
            qh, rest = rest[:, :32], rest[:, 32:]
            high = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1      # [n, 8, 32]
        pairs = rest.reshape(len(rest), 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
        levels = (pairs & 0x0F).reshape(len(rest), 8, 32)
        if high is not None:
            levels |= high << 4
        scales = (d[:, None] * sc.astype(np.float32)).reshape(-1)
        biases = -(dmin[:, None] * m.astype(np.float32)).reshape(-1)
        return levels.reshape(-1, 32), scales, biases
    if kind in ("Q4_1", "Q5_1"):
        m, rest = half(rest[:, :2]), rest[:, 2:]
    if kind == "Q8_0":
        levels = (rest.view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return levels, d, -128 * d
    high = None
    if kind in ("Q5_0", "Q5_1"):
        qh = np.ascontiguousarray(rest[:, :4]).view(np.uint32)[:, 0]
        high = ((qh[:, None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
        rest = rest[:, 4:]
    levels = np.concatenate([rest & 0x0F, rest >> 4], axis=1)   # values 0-15, then 16-31
    if high is not None:
        levels |= high << 4
    if kind in ("Q4_1", "Q5_1"):
        return levels, d, m
    return levels, d, -(8 if kind == "Q4_0" else 16) * d


def pack_levels(levels, bits: int):
    """MLX's packed layout of `bits`-bit levels [rows, cols]: each row one little-endian bit
    stream, read as uint32 words [rows, cols * bits / 32]."""
    import numpy as np

    rows, cols = levels.shape
    out = np.empty((rows, cols * bits // 32), np.uint32)
    shifts = np.arange(8, dtype=np.uint64) * bits
    step = max(1, (1 << 21) // cols)
    for r in range(0, rows, step):
        part = levels[r:r + step].astype(np.uint64).reshape(-1, cols // 8, 8)
        words = (part << shifts).sum(axis=-1, dtype=np.uint64)          # 8 levels in 8 * bits bits
        chunk = words.view(np.uint8).reshape(len(part), cols // 8, 8)[:, :, :bits]
        out[r:r + step] = np.ascontiguousarray(chunk).reshape(len(part), -1).view(np.uint32)
    return out


def gguf_exact_weights(gguf_path: Path, layout: dict, config: dict) -> dict:
    """The GGUF's own blocks of the `exact` weights of `layout` as MLX `weight`/`scales`/`biases`
    under HF names. llama.cpp stores llama's q/k rows permuted for its rope; undo that (rows only,
    so the blocks move whole)."""
    import mlx.core as mx
    from gguf import GGUFReader

    from kmismatch_lite.formats.export_gguf import unpermute_rows

    out = {}
    for t in GGUFReader(str(gguf_path)).tensors:
        base = t.name.removesuffix(".weight")
        path = hf_path(base)
        spec = layout.get(path) if path else None
        if not spec or not spec["exact"]:
            continue
        rows, cols = int(t.shape[1]), int(t.shape[0])
        block = 256 if spec["gguf_type"].endswith("_K") else 32
        levels, scales, biases = block_levels(t.data.reshape(rows * cols // block, -1), spec["gguf_type"])
        arrays = {"weight": pack_levels(levels.reshape(rows, cols), spec["bits"]),
                  "scales": scales.reshape(rows, -1), "biases": biases.reshape(rows, -1)}
        if config.get("model_type") == "llama" and base.endswith(("attn_q", "attn_k")):
            heads = config["num_attention_heads"] if base.endswith("attn_q") else config["num_key_value_heads"]
            arrays = {k: unpermute_rows(v, heads) for k, v in arrays.items()}
        out.update({f"{path}.{k}": mx.array(v) for k, v in arrays.items()})
    return out


def mlx_config_overrides(config: dict) -> dict:
    """transformers 5 writes `rope_parameters`; mlx-lm reads `rope_theta` (and, for Gemma 3,
    `rope_local_base_freq`). A GGUF `quantization_config` must not reach mlx-lm's loader."""
    out: dict = {}
    if (config.get("quantization_config") or {}).get("quant_method") == "gguf":
        out["quantization_config"] = None
    rope = config.get("rope_parameters")
    if not rope or "rope_theta" in config:
        return out
    if "full_attention" in rope:
        full, local = rope["full_attention"], rope.get("sliding_attention", {})
        out["rope_theta"] = full["rope_theta"]
        if "rope_theta" in local:
            out["rope_local_base_freq"] = local["rope_theta"]
    else:
        full = rope
        out["rope_theta"] = rope["rope_theta"]
    if full.get("rope_type", "default") != "default":
        out["rope_scaling"] = full
    return out


def load_float(hf_dir: Path):
    """(MLX model, its config) from a Hugging Face folder as it is: for a dequantized GGUF, its
    weights in float32, nothing requantized (lazy: weights load when used)."""
    require_mlx()
    from mlx_lm.utils import load_model

    config = json.loads((Path(hf_dir) / "config.json").read_text(encoding="utf-8"))
    model, config = load_model(Path(hf_dir), lazy=True, model_config=mlx_config_overrides(config))
    config = {k: v for k, v in config.items() if not (k == "quantization_config" and v is None)}
    config.pop("rope_parameters", None) if "rope_theta" in config else None
    return model, config


def convert_folder(hf_dir: Path, dest: Path, gguf_path: Path | None = None) -> Path:
    """A Hugging Face model folder into an MLX folder. With the GGUF it came from, each quantized
    weight stays quantized (module docstring): the GGUF's own blocks where they are MLX groups,
    else requantized to MLX 8-bit. Without it, or for a GGUF with unknown tensor names, float."""
    require_mlx()
    import mlx.core as mx
    from mlx_lm.utils import load_tokenizer, quantize_model, save

    model, config = load_float(hf_dir)
    tokenizer = load_tokenizer(Path(hf_dir))
    layout = gguf_layout(gguf_path) if gguf_path else None
    if layout:  # a GGUF weight the MLX model has no module for (a tied output) is not used
        modules = dict(model.named_modules())
        layout = {p: spec for p, spec in layout.items() if p in modules}
    record: dict = {"exact": {}, "requantized": {}}
    if layout:
        reference = {f"{p}.weight": w for p, w in _module_weights(model, layout).items()}
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):  # its "[INFO] Quantized" line
            model, config = quantize_model(model, config, 32, 4, quant_predicate=lambda p, m: (
                {k: layout[p][k] for k in ("group_size", "bits")} | {"mode": "affine"} if p in layout else False))
        model.load_weights(list(gguf_exact_weights(gguf_path, layout, config).items()), strict=False)
        record = _check_weights(model, reference, layout, hf_dir)
    mx.eval(model.parameters())
    with atomic_dir(dest) as tmp:
        save(tmp, hf_dir, model, tokenizer, config)
        (tmp / "README.md").unlink(missing_ok=True)
        source = {"hf_dir": str(hf_dir), "gguf": str(gguf_path) if gguf_path else None,
                  "quantized": bool(layout), "gguf_blocks": bool(layout) and not record["requantized"], **record,
                  "requantized_to": REQUANTIZED_TO if record["requantized"] else None}
        (tmp / "kmm_source.json").write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
    return dest


def source_record(path: Path) -> dict | None:
    """What the conversion of an MLX folder recorded (kmm_source.json), None for a hub folder."""
    found = Path(path) / "kmm_source.json"
    return json.loads(found.read_text(encoding="utf-8")) if found.is_file() else None


def _module_weights(model, paths) -> dict:
    """{module path: weight} of the modules named in `paths`, as they are now."""
    return {p: m.weight for p, m in model.named_modules() if p in paths}


def _check_weights(model, reference: dict, layout: dict, hf_dir: Path) -> dict:
    """Each exact weight, dequantized, must equal the Hugging Face folder's (a wrong name map,
    block decoding or q/k permutation would not); the requantized ones are measured.
    Returns the record: GGML types kept and requantized, with the requantization's error."""
    import mlx.core as mx
    import mlx.nn as nn

    found = {p: m for p, m in model.named_modules() if p in layout}
    exact: dict[str, int] = {}
    requantized: dict[str, int] = {}
    err2, ref2 = 0.0, 0.0
    for path, module in found.items():
        spec = layout[path]
        if not isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)) or module.bits != spec["bits"]:
            raise KmmError(f"{hf_dir}: {path} was not quantized to {spec['bits']} bits")
        ref = reference.pop(f"{path}.weight").astype(mx.float32)     # freed once checked
        w = mx.dequantize(module.weight, module.scales, module.biases, group_size=module.group_size,
                          bits=module.bits)
        if spec["exact"]:
            err = mx.abs(w - ref).max().item()
            if err > 1e-6 * max(1.0, mx.abs(ref).max().item()):
                raise KmmError(f"GGUF blocks for {path} differ from {hf_dir} (max error {err:.3g})")
            exact[spec["gguf_type"]] = exact.get(spec["gguf_type"], 0) + 1
        else:
            err2 += mx.sum(mx.square(w - ref)).item()
            ref2 += mx.sum(mx.square(ref)).item()
            requantized[spec["gguf_type"]] = requantized.get(spec["gguf_type"], 0) + 1
    return {"exact": exact, "requantized": requantized,
            **({"requantized_relative_rms_error": round((err2 / ref2) ** 0.5, 5)} if requantized else {})}


def load(path: Path, adapter: Path | None = None):
    """(model, tokenizer) from an MLX folder, with an mlx-lm LoRA adapter folder if given."""
    require_mlx()
    from mlx_lm import load as mlx_load

    # mlx-lm takes a path it cannot find for a hub repo and downloads it: never at run time.
    if not (Path(path) / "config.json").is_file():
        raise KmmError(f"no MLX model folder at {path}")

    return mlx_load(str(path), adapter_path=str(adapter) if adapter else None)


def quantized(path: Path) -> bool:
    """Whether the MLX folder holds a quantized model (fine-tuning it is QLoRA)."""
    return "quantization" in json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))


# LoRA pieces for the MLX trainer.

def collate(items) -> tuple:
    """(input ids [batch, width], rows, columns, labels): the positions whose next token is a
    target token, so only those go through the output layer (Gemma's vocabulary is 262k)."""
    import mlx.core as mx
    import numpy as np

    width = max(len(e.ids) for e in items)
    ids = np.zeros((len(items), width), np.int32)
    rows, cols, labels = [], [], []
    for r, e in enumerate(items):
        ids[r, :len(e.ids)] = e.ids
        for pos in range(e.n_prompt, len(e.ids)):
            rows.append(r), cols.append(pos - 1), labels.append(e.ids[pos])
    return mx.array(ids), mx.array(rows), mx.array(cols), mx.array(labels)


def output_head(net, hidden):
    """Logits from final hidden states, as the model's own `__call__` would compute them."""
    import mlx.core as mx

    head = getattr(net, "lm_head", None)
    logits = head(hidden) if head is not None else net.model.embed_tokens.as_linear(hidden)
    cap = getattr(getattr(net, "args", None), "final_logit_softcapping", None)
    return mx.tanh(logits / cap) * cap if cap else logits


def last_logits(net, ids, cache):
    """Logits of the next token after `ids` [1, n]: the output layer runs on the last position
    only (with Gemma's 262k vocabulary it costs more than the transformer)."""
    return output_head(net, net.model(ids, cache=cache)[0, -1])


def target_loss(net, ids, rows, cols, labels):
    """Mean cross-entropy of the target tokens (right padding: no real token attends a pad)."""
    import mlx.core as mx
    import mlx.nn as nn

    logits = output_head(net, net.model(ids)[rows, cols])
    return nn.losses.cross_entropy(logits.astype(mx.float32), labels).mean()


def lora_keys(net, targets: Sequence[str]) -> list[str]:
    """Module paths inside a layer whose last name is a target (`q_proj` -> `self_attn.q_proj`)."""
    import mlx.nn as nn

    found = [k for k, m in net.layers[0].named_modules()
             if k.rsplit(".", 1)[-1] in targets and isinstance(m, (nn.Linear, nn.QuantizedLinear))]
    missing = set(targets) - {k.rsplit(".", 1)[-1] for k in found}
    if missing:
        raise KmmError(f"target modules not in the model: {', '.join(sorted(missing))}")
    return sorted(found)


def lora_arrays(weights: dict) -> dict:
    """mlx-lm keeps lora_a [in, rank] and lora_b [rank, out]; the export wants A [rank, in] and
    B [out, rank] under the HF module name. The scale (alpha / rank) is unchanged."""
    import numpy as np

    out = {}
    for key, a in weights.items():
        if key.endswith(".lora_a"):
            module = key.removesuffix(".lora_a")
            b = weights[f"{module}.lora_b"]
            out[module] = (np.array(a.T, np.float32), np.array(b.T, np.float32))
    return out
