"""MLX generation and LoRA fine-tuning with mlx-lm (Apple Silicon; CPU on Linux).

The generator decodes greedily with one KV cache kept across prompts, trimmed back to the
longest token prefix shared with the next prompt, so a few-shot prefix is evaluated once.
mlx and mlx_lm are imported inside the methods, so `import kmismatch_lite` stays light.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from kmismatch_lite import cards, mlx_models
from kmismatch_lite.errors import KmmError

OPTIONS = {"source": str}


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
    """Greedy answers from an MLX model (the bundled GGUF converted, or the card's MLX repo)."""

    name = "mlx"

    def __init__(self, model: cards.Model, *, adapter: Path | None = None, seed: int = 0,
                 source: str = "auto"):
        mlx_models.require_mlx()
        import mlx.core as mx

        mx.random.seed(seed)
        self.model, self.seed, self.source = model, seed, source
        self.path = mlx_models.model_dir(model, source)
        self.adapter = adapter_folder(adapter)
        self.net, self.tokenizer = mlx_models.load(self.path, self.adapter)
        self._cache: list = []
        self._cached: list[int] = []

    def info(self) -> dict[str, Any]:
        import mlx.core as mx
        import mlx_lm

        return {"backend": self.name, "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__,
                "device": str(mx.default_device()), "model": str(self.path),
                "adapter": str(self.adapter) if self.adapter else None}

    def close(self) -> None:
        self.net = self._cache = None

    def _prefill(self, tokens: list[int]):
        """Logits after `tokens`, reusing the cached KV entries of their shared prefix."""
        import mlx.core as mx
        from mlx_lm.models import cache as kv

        keep = 0
        limit = min(len(tokens) - 1, len(self._cached))
        while keep < limit and tokens[keep] == self._cached[keep]:
            keep += 1
        drop = len(self._cached) - keep
        if not self._cache or (drop and kv.trim_prompt_cache(self._cache, drop) != drop):
            self._cache, keep = kv.make_prompt_cache(self.net), 0
        self._cached = list(tokens)
        return self.net(mx.array(tokens[keep:])[None], cache=self._cache)[0, -1]

    def _complete(self, prompt: str, max_tokens: int, stop: Sequence[str]) -> str:
        import mlx.core as mx

        tokens = self.tokenizer.encode(prompt)
        logits = self._prefill(tokens)
        out: list[int] = []
        text = ""
        for _ in range(max_tokens):
            tok = int(mx.argmax(logits).item())
            if tok in self.tokenizer.eos_token_ids:
                break
            out.append(tok)
            text = self.tokenizer.decode(out)
            if any(s in text for s in stop) or len(out) == max_tokens:
                break
            self._cached.append(tok)
            logits = self.net(mx.array([[tok]]), cache=self._cache)[0, -1]
        for s in stop:
            text = text.split(s, 1)[0]
        return text.strip()

    def generate(self, prompts: Sequence[str], *, max_tokens: int, stop: Sequence[str],
                 progress=None) -> list[str]:
        outputs = []
        for prompt in prompts:
            outputs.append(self._complete(prompt, max_tokens, stop))
            if progress:
                progress(1)
        return outputs
