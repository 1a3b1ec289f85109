"""The dose-response statistic (protocol step 9): the slope of an outcome rate per unit mismatch
dose (the wrong-answer rate's is the headline), pooled over seeds, with a hierarchical
bootstrap interval (resample seeds, then the test questions within each resampled seed).

The slope of a seed is the least-squares line through its (dose, rate) points; the pooled slope
is the mean of the seeds' slopes (equal to the seed-fixed-effects slope when every seed has the
same doses). A resampled question keeps its outcome at every dose, since all doses answer the
same test questions.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from kmismatch_lite.qa import scoring
from kmismatch_lite.errors import missing_extra


def _matrix(per_dose: Mapping[float, Sequence[bool]], doses: list[float]) -> np.ndarray:
    """Doses x questions outcome flags of one seed."""
    if sorted(map(float, per_dose)) != doses:
        raise ValueError(f"every seed needs the same doses ({', '.join(f'{d:g}' for d in doses)})")
    rows = [np.asarray(per_dose[d], dtype=bool) for d in sorted(per_dose)]
    if len({len(r) for r in rows}) != 1 or len(rows[0]) == 0:
        raise ValueError("every dose of a seed must score the same, non-empty list of test questions")
    return np.vstack(rows)


def dose_slope(outcomes: Sequence[Mapping[float, Sequence[bool]]], n_boot: int = 2000, seed: int = 0,
               level: float = 0.95) -> dict:
    """`outcomes[s][dose]` holds seed s's per-question flags (True = wrong, say) at that dose.

    Returns the pooled slope with its percentile interval, each dose's pooled rate with its
    interval from the same resamples, and each seed's slope, intercept and rates."""
    try:
        from scipy import stats as st
    except ImportError:
        raise missing_extra("scipy", "stats") from None

    if not outcomes:
        raise ValueError("the dose-response slope needs at least one seed")
    doses = sorted(map(float, outcomes[0]))
    if len(doses) < 2:
        raise ValueError("the dose-response slope needs at least two doses")
    mats = [_matrix(o, doses) for o in outcomes]
    x = np.asarray(doses)
    per_seed = []
    for m in mats:
        fit = st.linregress(x, m.mean(axis=1))
        per_seed.append({"slope": float(fit.slope), "intercept": float(fit.intercept),
                         "rates": m.mean(axis=1).tolist()})
    slopes, rates = _bootstrap(x, mats, n_boot, np.random.default_rng(seed))
    q = [(1 - level) / 2, 1 - (1 - level) / 2]
    seed_rates = np.array([p["rates"] for p in per_seed])
    return {
        "seeds": len(mats),
        "doses": doses,
        "slope": float(np.mean([p["slope"] for p in per_seed])),
        "slope_ci": np.quantile(slopes, q).tolist(),
        "rates": seed_rates.mean(axis=0).tolist(),
        "rates_ci": np.quantile(rates, q, axis=0).T.tolist(),
        "per_seed": per_seed,
    }


def _bootstrap(x: np.ndarray, mats: list[np.ndarray], n_boot: int,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n_boot pooled slopes and n_boot x doses pooled rates: seeds drawn with replacement, then
    each drawn seed's questions drawn with replacement (one draw shared by all its doses)."""
    from kmismatch_lite.stats import resample_seeds_then_questions

    rates = resample_seeds_then_questions(mats, n_boot, rng)
    # One least-squares line per (resample, seed): polyfit fits every column of y at once.
    lines = np.polyfit(x, rates.reshape(-1, len(x)).T, 1)
    slopes = lines[0].reshape(n_boot, len(mats)).mean(axis=1)
    return slopes, rates.mean(axis=1)


def by_verdict(samples: Sequence[Mapping[float, Sequence[dict]]], n_boot: int = 2000, seed: int = 0,
               level: float = 0.95) -> dict[str, dict]:
    """`dose_slope` of the correct, wrong and abstained rates, from `samples[s][dose]`: seed s's
    evaluation rows (id, verdict) at that dose, the same test questions in the same order."""
    for s, per_dose in enumerate(samples):
        ids = [[r["id"] for r in rows] for rows in per_dose.values()]
        if any(i != ids[0] for i in ids):
            raise ValueError(f"seed {s}: the doses were not evaluated on the same questions in the same order")
    return {v: dose_slope([{d: [r["verdict"] == v for r in rows] for d, rows in per_dose.items()}
                           for per_dose in samples], n_boot, seed, level)
            for v in scoring.VERDICTS}
