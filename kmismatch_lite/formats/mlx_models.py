"""Model folders for MLX: a card's `mlx-community` repo from the local Hugging Face cache, or the
bundled GGUF converted offline (GGUF -> Hugging Face folder -> MLX folder), cached.

A GGUF whose weights are all Q4_0/Q4_1 (or Q8_0) is re-quantized with MLX's affine quantization
at group size 32: those GGUF blocks are affine 32-value groups too, so MLX computes with the same
weights as llama.cpp and fine-tuning is QLoRA on them. K-quant files (Q4_K_M) stay dequantized.
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
# GGML tensor type ids whose blocks map one to one onto MLX affine groups of 32 values.
_AFFINE_BITS = {2: 4, 3: 4, 8: 8}  # Q4_0, Q4_1, Q8_0
# llama.cpp tensor names -> Hugging Face module paths (layer N is `blk.N.` / `model.layers.N.`).
_HF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj", "token_embd": "model.embed_tokens", "output": "lm_head"}


def require_mlx() -> None:
    try:
        import mlx.core  # noqa: F401
        import mlx_lm  # noqa: F401
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

    return f"{model.name}-{gguf_sha256(Path(model.gguf_path))[:16]}"


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


def affine_layout(gguf_path: Path) -> dict[str, int] | None:
    """{HF module path: bits} when every 2-D weight of the GGUF is Q4_0, Q4_1 or Q8_0 under a
    known name, else None (K-quants and others do not map onto MLX groups: stay dequantized)."""
    from gguf import GGUFReader

    layout = {}
    for t in GGUFReader(str(gguf_path)).tensors:
        if len(t.shape) != 2:
            continue
        path, bits = hf_path(t.name.removesuffix(".weight")), _AFFINE_BITS.get(int(t.tensor_type))
        if path is None or bits is None:
            return None
        layout[path] = bits
    return layout


def gguf_affine_weights(gguf_path: Path, config: dict) -> dict:
    """The GGUF's own quantized blocks as MLX `weight`/`scales`/`biases` under HF names.
    llama.cpp stores llama's q/k rows permuted for its rope; undo that (rows only, so the
    packed blocks move whole)."""
    import mlx.core as mx

    from kmismatch_lite.formats.export_gguf import unpermute_rows

    raw = mx.load(str(gguf_path))
    out = {}
    for name, arr in raw.items():
        base, _, leaf = name.rpartition(".")
        path = hf_path(base)
        if path is None or leaf not in ("weight", "scales", "biases") or arr.ndim != 2:
            continue
        if config.get("model_type") == "llama" and base.endswith(("attn_q", "attn_k")):
            heads = config["num_attention_heads"] if base.endswith("attn_q") else config["num_key_value_heads"]
            arr = unpermute_rows(arr, heads)
        out[f"{path}.{leaf}"] = arr if leaf == "weight" else arr.astype(mx.float32)
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


def convert_folder(hf_dir: Path, dest: Path, gguf_path: Path | None = None) -> Path:
    """A Hugging Face model folder into an MLX folder. With the GGUF it came from, and that GGUF
    all Q4_0/Q4_1/Q8_0, the MLX model is quantized and holds the GGUF's exact blocks."""
    require_mlx()
    import mlx.core as mx
    from mlx_lm.utils import load_model, load_tokenizer, quantize_model, save

    config = json.loads((Path(hf_dir) / "config.json").read_text(encoding="utf-8"))
    model, config = load_model(Path(hf_dir), lazy=True, model_config=mlx_config_overrides(config))
    config = {k: v for k, v in config.items() if not (k == "quantization_config" and v is None)}
    config.pop("rope_parameters", None) if "rope_theta" in config else None
    tokenizer = load_tokenizer(Path(hf_dir))
    layout = affine_layout(gguf_path) if gguf_path else None
    if layout:
        reference = {k: v for k, v in _flat(model).items() if k.endswith("v_proj.weight") or k.endswith("q_proj.weight")}
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):  # its "[INFO] Quantized" line
            model, config = quantize_model(model, config, 32, 4, quant_predicate=lambda p, m: (
                {"group_size": 32, "bits": layout[p], "mode": "affine"} if p in layout else False))
        model.load_weights(list(gguf_affine_weights(gguf_path, config).items()), strict=False)
        _check_same(model, reference, hf_dir)
    mx.eval(model.parameters())
    with atomic_dir(dest) as tmp:
        save(tmp, hf_dir, model, tokenizer, config)
        (tmp / "README.md").unlink(missing_ok=True)
        source = {"hf_dir": str(hf_dir), "gguf": str(gguf_path) if gguf_path else None,
                  "gguf_blocks": bool(layout)}
        (tmp / "kmm_source.json").write_text(json.dumps(source) + "\n", encoding="utf-8")
    return dest


def _flat(model) -> dict:
    from mlx.utils import tree_flatten

    return dict(tree_flatten(model.parameters()))


def _check_same(model, reference: dict, hf_dir: Path) -> None:
    """The GGUF blocks, dequantized, must equal the Hugging Face folder's weights (a wrong name
    map or q/k permutation would not)."""
    import mlx.core as mx

    params = _flat(model)
    for key, ref in reference.items():
        base = key.removesuffix(".weight")
        w = mx.dequantize(params[key], params[f"{base}.scales"], params[f"{base}.biases"],
                          group_size=32, bits=params[key].shape[1] * 32 // ref.shape[1])
        err = mx.abs(w - ref.astype(mx.float32)).max().item()
        if err > 1e-2 * max(1.0, mx.abs(ref).max().item()):
            raise KmmError(f"GGUF blocks for {base} differ from {hf_dir} (max error {err:.3g})")


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
