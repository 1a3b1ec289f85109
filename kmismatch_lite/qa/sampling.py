"""How a generator picks each answer's tokens: greedily (temperature 0, the default), or by seeded
temperature sampling.

Sampling is plain temperature sampling over the whole vocabulary: softmax(logits / T), with no
top-k, top-p or min-p truncation (SliCK's samples at T = 0.5 are of the model's own distribution).
Each prompt's answer draws from a random stream of its own, seeded from the sampling seed and the
prompt's text, so the answer does not depend on the batch it came in, its place in the batch or the
other prompts. Local backends sample here from the logits they compute; a server is sent the
temperature and the prompt's seed.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Callable

from kmismatch_lite.errors import KmmError

TRUNCATION = "none"


@dataclass(frozen=True)
class Sampling:
    """Decoding settings: temperature 0 is greedy (argmax); above 0, seeded temperature sampling."""

    temperature: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise KmmError(f"temperature must be a number >= 0 (got {self.temperature})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def prompt_seed(self, prompt: str) -> int:
        """The seed of one prompt's answer, from the sampling seed and the prompt's text."""
        return derive_seed(f"{self.seed}\0{prompt}")

    def picker(self, prompt: str) -> Callable[[Any], int]:
        """The function that picks the next token of `prompt`'s answer from a logits vector:
        argmax when greedy, else a draw from the prompt's own random stream."""
        import numpy as np

        if self.greedy:
            return lambda logits: int(np.argmax(logits))
        rng = np.random.default_rng(self.prompt_seed(prompt))
        return lambda logits: sample(logits, self.temperature, rng)

    def describe(self) -> dict[str, Any]:
        """The settings as recorded in metrics and manifests."""
        if self.greedy:
            return {"temperature": 0.0, "method": "greedy"}
        return {"temperature": self.temperature, "seed": self.seed, "method": "temperature sampling",
                "truncation": TRUNCATION, "prompt_seed": "sha256 of the seed and the prompt text"}


GREEDY = Sampling()


def derive_seed(text: str) -> int:
    """A seed named by `text` (its sha256), in 31 bits: servers take a seed as a signed or
    unsigned 32-bit number, and llama.cpp reads 2^32-1 as random."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def sample(logits, temperature: float, rng) -> int:
    """One token drawn from softmax(logits / temperature), by inverse CDF with one uniform draw."""
    import numpy as np

    z = np.asarray(logits, dtype=np.float64) / temperature
    weights = np.exp(z - z.max())
    cdf = np.cumsum(weights)
    return min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), len(cdf) - 1)
