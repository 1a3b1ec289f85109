"""MLX generation and LoRA fine-tuning with mlx-lm (Apple Silicon; CPU on Linux).

The generator decodes greedily (or by kmismatch_lite.qa.sampling's seeded temperature sampling, on
the logits copied to numpy) with one KV cache kept across prompts, trimmed back to the longest
token prefix shared with the next prompt, so a few-shot prefix is evaluated once. With
`parallel=N` (N > 1), greedy answers are decoded N at once by mlx-lm's BatchGenerator (prompts
left-padded into one batch; each prompt's whole text is evaluated, no prefix is shared).
The trainer is mlx-lm's LoRA (QLoRA on a quantized MLX model) with the torch trainer's
tokenisation, dev split, batch plan, target-only loss, rate schedule and early stop, so both
backends hold out the same examples, see the rest in the same order and keep an epoch by the same
rule. mlx and mlx_lm are imported inside the methods, so `import kmismatch_lite` stays light.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

from kmismatch_lite import cards, lora_data
from kmismatch_lite.formats import mlx_models
from kmismatch_lite.backends import answer_each, common_length
from kmismatch_lite.qa.prompts import clean_output
from kmismatch_lite.errors import KmmError
from kmismatch_lite.qa.sampling import GREEDY, Sampling

OPTIONS = {"source": str, "parallel": int}


def adapter_folder(adapter: Path | None) -> Path | None:
    """The mlx-lm adapter folder: given directly, or the `adapter/` beside a fine-tune's GGUF."""
    if adapter is None:
        return None
    adapter = Path(adapter)
    for cand in (adapter, adapter.parent / "adapter"):
        if (cand / "adapter_config.json").is_file() and (cand / "adapters.safetensors").is_file():
            return cand
    raise KmmError(f"{adapter}: MLX needs an mlx-lm adapter folder (adapter_config.json and "
                   "adapters.safetensors), such as DIR/adapter/ of an MLX fine-tune")


class MlxGenerator:
    """Greedy or sampled answers from an MLX model (the bundled GGUF converted, or the card's MLX repo)."""

    name = "mlx"

    def __init__(self, model: cards.Model, *, adapter: Path | None = None, seed: int = 0,
                 source: str = "auto", parallel: int = 1):
        if parallel < 1:
            raise KmmError(f"parallel must be at least 1 (got {parallel})")
        mlx_models.require_mlx()
        import mlx.core as mx

        mx.random.seed(seed)
        self.model, self.seed, self.source, self.parallel = model, seed, source, parallel
        self.path = mlx_models.model_dir(model, source)
        self.adapter = adapter_folder(adapter)
        self.net, self.tokenizer = mlx_models.load(self.path, self.adapter)
        self._cache: list = []
        self._cached: list[int] = []

    def info(self) -> dict[str, Any]:
        import mlx.core as mx
        import mlx_lm

        return {"backend": self.name, "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__,
                "device": str(mx.default_device()), "model": str(self.path), "source": self.source,
                "quantized": mlx_models.quantized(self.path),
                "adapter": str(self.adapter) if self.adapter else None, "parallel": self.parallel}

    def close(self) -> None:
        self.net = self._cache = None

    def _prefill(self, tokens: list[int]):
        """Logits after `tokens`, reusing the cached KV entries of their shared prefix."""
        import mlx.core as mx
        from mlx_lm.models import cache as kv

        keep = common_length(self._cached, tokens[:-1])
        drop = len(self._cached) - keep
        if not self._cache or (drop and kv.trim_prompt_cache(self._cache, drop) != drop):
            self._cache, keep = kv.make_prompt_cache(self.net), 0
        self._cached = list(tokens)
        return mlx_models.last_logits(self.net, mx.array(tokens[keep:])[None], self._cache)

    def _complete(self, prompt: str, max_tokens: int, stop: Sequence[str], sampling: Sampling) -> str:
        import mlx.core as mx
        import numpy as np

        tokens = self.tokenizer.encode(prompt)
        logits = self._prefill(tokens)
        pick = sampling.picker(prompt)
        out: list[int] = []
        text = ""
        for _ in range(max_tokens):
            if sampling.greedy:
                tok = int(mx.argmax(logits).item())
            else:
                tok = pick(np.array(logits.astype(mx.float32)))
            if tok in self.tokenizer.eos_token_ids:
                break
            out.append(tok)
            text = self.tokenizer.decode(out)
            if any(s in text for s in stop) or len(out) == max_tokens:
                break
            self._cached.append(tok)
            logits = mlx_models.last_logits(self.net, mx.array([[tok]]), self._cache)
        return clean_output(text, stop)

    def generate(self, prompts: Sequence[str], *, max_tokens: int, stop: Sequence[str],
                 progress=None, sampling: Sampling = GREEDY) -> list[str]:
        if self.parallel > 1 and sampling.greedy and prompts and max_tokens > 0:
            return self._batched(prompts, max_tokens, stop, progress)
        return answer_each(self._complete, prompts, max_tokens, stop, progress, sampling)

    def _batched(self, prompts: Sequence[str], max_tokens: int, stop: Sequence[str], progress) -> list[str]:
        """Greedy answers decoded `parallel` at once by mlx-lm's BatchGenerator; an answer leaves
        the batch at end of generation, a stop string or the token cap."""
        import importlib

        batching = importlib.import_module("mlx_lm.generate")
        if not hasattr(batching, "BatchGenerator"):
            raise KmmError("parallel answers need an mlx-lm with BatchGenerator (0.32 has it): "
                           "pip install -U mlx-lm, or use parallel=1")
        gen = batching.BatchGenerator(self.net, stop_tokens=[[t] for t in self.tokenizer.eos_token_ids],
                                      completion_batch_size=self.parallel,
                                      prefill_batch_size=min(8, self.parallel))
        try:
            uids = gen.insert([self.tokenizer.encode(p) for p in prompts], [max_tokens] * len(prompts))
            tokens: dict[int, list[int]] = {u: [] for u in uids}
            texts: dict[int, str] = dict.fromkeys(uids, "")
            while responses := gen.next_generated():
                ended = []
                for r in responses:
                    if r.finish_reason != "stop":          # "stop": an end-of-generation token
                        tokens[r.uid].append(r.token)
                        texts[r.uid] = self.tokenizer.decode(tokens[r.uid])
                    hit = r.finish_reason is None and any(s in texts[r.uid] for s in stop)
                    if hit:
                        ended.append(r.uid)
                    if (hit or r.finish_reason is not None) and progress:
                        progress(1)
                if ended:
                    gen.remove(ended)
        finally:
            gen.close()
        return [clean_output(texts[u], stop) for u in uids]


def greedy_answers(model: cards.Model, adapter_dir: Path | None, prompts: Sequence[str], *,
                   max_tokens: int) -> list[str]:
    """Greedy answers of the MLX model with the adapter, for fine-tuning's faithfulness check."""
    gen = MlxGenerator(model, adapter=adapter_dir)
    try:
        return gen.generate(prompts, max_tokens=max_tokens, stop=["\n"])
    finally:
        gen.close()


class MlxTrainer:
    """LoRA with mlx-lm's LoRA layers and AdamW; writes DIR/adapter/ in mlx-lm's format (and, with
    `save_epochs`, each epoch's LoRA in DIR/epochs/epoch-N/adapter/). As the torch trainer: the
    same dev split (lora_data.dev_split), early stop on `patience` keeping the best epoch's LoRA,
    and the same rate schedule (lora_data.lr_factor)."""

    name = "mlx"

    def __init__(self, model: cards.Model, settings, *, source: str | None = None):
        mlx_models.require_mlx()
        source = source or getattr(settings, "base_weights", "gguf")
        self.model, self.settings, self.path = model, settings, mlx_models.model_dir(model, source)

    def train(self, examples: Sequence[dict], out_dir, *, progress=None) -> dict[str, Any]:
        import mlx.core as mx
        import mlx.optimizers as optim
        from mlx_lm.tuner.utils import linear_to_lora_layers

        from kmismatch_lite.lora_data import epoch_dir

        s = self.settings
        mx.random.seed(s.seed)
        net, tokenizer = mlx_models.load(self.path)
        encoded, cut = lora_data.encode(tokenizer._tokenizer, examples, s.max_length)
        train_ids, dev_ids = lora_data.dev_split(len(encoded), getattr(s, "dev_fraction", 0.0), s.seed)
        train, dev = [encoded[i] for i in train_ids], [encoded[i] for i in dev_ids]
        net.freeze()
        config = {"rank": s.rank, "scale": s.alpha / s.rank, "dropout": s.dropout,
                  "keys": mlx_models.lora_keys(net, s.target_modules)}
        linear_to_lora_layers(net, len(net.layers), config)
        lengths = [len(e.ids) for e in train]
        plan = lora_data.batch_plan(lengths, s.batch_size, s.epochs, s.seed)
        opt = optim.AdamW(learning_rate=rate_schedule(s.learning_rate, getattr(s, "lr_schedule", "constant"),
                                                      len(plan)), weight_decay=0.0, bias_correction=True)
        best = MlxDevCheck(net, dev, s) if dev else None
        epoch_loras: dict[int, dict] = {}

        def save_epoch(epoch: int) -> None:
            # Before any dev check restores an earlier epoch: this epoch's own weights.
            epoch_loras[epoch] = self._save(net, config, epoch_dir(out_dir, epoch) / "adapter")

        per_epoch = lora_data.n_batches(len(train), s.batch_size)
        log, seconds, tokens = _loop(net, opt, train, plan, progress, per_epoch,
                                     save_epoch if getattr(s, "save_epochs", False) else None, best)
        return {
            "lora": self._save(net, config, Path(out_dir) / "adapter"), "epoch_loras": epoch_loras, "log": log,
            "steps": len(log), "final_loss": log[-1]["loss"],
            "tokens": tokens, "train_seconds": round(seconds, 3), "tokens_per_second": round(tokens / seconds, 1),
            "truncated_prompts": cut, "padding_waste": round(lora_data.padding_waste(plan[:len(log)], lengths), 4),
            "mlx_model": str(self.path), "quantized_base": mlx_models.quantized(self.path),
            "mlx_conversion": mlx_models.source_record(self.path),
            **(best.summary() if best else {}),
        }

    def _save(self, net, config: dict, adapter: Path) -> dict:
        """The LoRA as it is now, written to `adapter` in mlx-lm's format; returns it for the export."""
        import mlx.core as mx
        from mlx.utils import tree_flatten

        weights = dict(tree_flatten(net.trainable_parameters()))
        adapter.mkdir(parents=True, exist_ok=True)
        mx.save_safetensors(str(adapter / "adapters.safetensors"), weights)
        (adapter / "adapter_config.json").write_text(json.dumps(
            {"fine_tune_type": "lora", "num_layers": len(net.layers), "lora_parameters": config,
             "model": str(self.path), "kmm_settings": vars(self.settings)}, indent=2) + "\n", encoding="utf-8")
        return mlx_models.lora_arrays(weights)


def rate_schedule(learning_rate: float, schedule: str, steps: int):
    """The optimizer's learning rate: a number for "constant", else a function of the number of
    updates made so far (mx.array), `learning_rate * lora_data.lr_factor(schedule, steps)`: for
    "linear", from the full rate at the first step down to rate / steps at the last, as torch's."""
    import mlx.core as mx

    if schedule == "constant":
        return learning_rate
    factor = lora_data.lr_factor(schedule, steps)
    return lambda step: mx.array(learning_rate * factor(int(step.item())), mx.float32)


class MlxDevCheck(lora_data.DevCheck):
    """lora_data.DevCheck on an MLX model with LoRA layers: the dev loss in length-sorted batches
    of `batch_size`, weighted by target tokens, as the torch trainer's."""

    def __init__(self, net, dev: Sequence, settings):
        super().__init__(dev, getattr(settings, "patience", 0))
        self.net, self.batch_size = net, settings.batch_size

    def loss(self) -> float:
        return dev_loss(self.net, self.dev, self.batch_size)

    def snapshot(self) -> dict:
        from mlx.utils import tree_flatten

        return dict(tree_flatten(self.net.trainable_parameters()))  # arrays are immutable: a copy

    def restore(self) -> None:
        self.net.load_weights(list(self.best_state.items()), strict=False)


def dev_loss(net, items: Sequence, batch_size: int) -> float:
    """Mean cross-entropy over all target tokens of `items` (lora_data.Encoded), dropout off."""
    order = sorted(range(len(items)), key=lambda i: len(items[i].ids))
    total, count = 0.0, 0
    net.eval()
    for start in range(0, len(order), batch_size):
        batch = mlx_models.collate([items[i] for i in order[start:start + batch_size]])
        n = int(batch[-1].size)
        total += mlx_models.target_loss(net, *batch).item() * n
        count += n
    net.train()
    return total / count


def _loop(net, opt, encoded, plan, progress, per_epoch: int, on_epoch=None, best=None) -> tuple[list[dict], float, int]:
    """The optimizer steps of `plan`; after each of its `per_epoch`-step epochs, `on_epoch(epoch)`
    then the dev check, which may stop training; at the end the best epoch's LoRA is put back."""
    import mlx.core as mx
    import mlx.nn as nn

    step_fn = nn.value_and_grad(net, mlx_models.target_loss)
    net.train()
    log, seconds, tokens = [], 0.0, 0
    for step, batch_ids in enumerate(plan, 1):
        t0 = time.perf_counter()
        batch = mlx_models.collate([encoded[i] for i in batch_ids])
        loss, grads = step_fn(net, *batch)
        opt.update(net, grads)
        mx.eval(loss, net.trainable_parameters(), opt.state)
        seconds += time.perf_counter() - t0
        tokens += sum(len(encoded[i].ids) for i in batch_ids)
        row = {"step": step, "loss": round(loss.item(), 5), "tokens_per_second": round(tokens / seconds, 1),
               "learning_rate": float(opt.learning_rate.item())}
        if lora_data.step_done(row, log, progress, per_epoch, len(plan), on_epoch, best):
            break
    if best:
        best.restore()
    return log, seconds, tokens
