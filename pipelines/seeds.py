"""Several training seeds of one experiment: their mean and spread per method, and a paired bootstrap
interval for one method minus another over the same test images (`retformer demo --seeds N`).

A seed changes what training draws (initial weights, batch order, mixup: the experiment's
`train.seed`); the KB, the neighbour tables and the val / test splits stay the same, so the votes
(knn_vote, knn_weighted, caption_vote) are the same in every seed and only the trained methods move.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np

from retformer.pipelines.runs import predictions_path, read_predictions

METRICS = ("top1", "top5", "many", "medium", "few", "macro_f1", "worst_class")
# Methods RetFormer is compared with in the bootstrap line (the strongest of them on the mean test top-1).
BASELINES = (
    "mlp_only",
    "linear_probe",
    "knn_vote",
    "knn_weighted",
    "caption_vote",
    "mlp_vote",
    "ncm",
    "zeroshot",
)


def seed_list(first: int, count: int) -> list[int]:
    """`count` consecutive seeds from the experiment's own `train.seed` (so seed list [s] is the run a
    one-seed demo makes)."""
    if count < 1:
        raise ValueError(f"seeds must be >= 1, got {count}")
    return [first + i for i in range(count)]


def mean_over_seeds(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """results.json's `methods` of several seeds as one: per method and metric the mean, `<metric>_sd`
    (sample standard deviation; 0 for one seed) and `<metric>_seeds` (each seed's value, in seed order).
    A method skipped in any seed stays skipped; `selected` and `val` are kept per seed (`selected_seeds`)."""
    out: dict[str, Any] = {}
    names = list(dict.fromkeys(m for s in summaries for m in s["methods"]))
    for name in names:
        rows = [s["methods"].get(name, {"skipped": "missing in a seed"}) for s in summaries]
        skipped = next((r for r in rows if "skipped" in r), None)
        if skipped is not None:
            out[name] = {"skipped": skipped["skipped"]}
            continue
        entry: dict[str, Any] = {}
        for key in METRICS:
            values = [r.get(key) for r in rows]
            if any(v is None for v in values):
                entry[key] = None
                continue
            entry[key] = statistics.fmean(values)
            entry[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
            entry[f"{key}_seeds"] = values
        entry["val_top1"] = _mean_or_none([(r.get("val") or {}).get("top1") for r in rows])
        entry["selected_seeds"] = [r.get("selected") for r in rows]
        out[name] = entry
    return out


def _mean_or_none(values: list[Any]) -> float | None:
    return None if any(v is None for v in values) else statistics.fmean(values)


def _correct(run_dir: Path, result: str, group: str | None) -> np.ndarray:
    """Per test image: 1.0 where the result's prediction is right (in the predictions file's row order),
    only the images of one shot group when `group` is given."""
    table = read_predictions(run_dir, result, ["correct", "shot_group"])
    if table is None:
        raise FileNotFoundError(predictions_path(run_dir, result))
    correct = table.column("correct").to_numpy(zero_copy_only=False).astype(np.float64)
    if group is None:
        return correct
    groups = np.asarray(table.column("shot_group").to_pylist(), dtype=object)
    return correct[groups == group]


def paired_bootstrap(
    run_dirs: list[Path],
    method: str,
    baseline: str,
    group: str | None = None,
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, float]:
    """`method` minus `baseline` on the same images, averaged over the seeds' runs: the difference of the
    mean accuracies and its 95% percentile interval over `resamples` resamplings of the images (each
    resampling draws the same images for both methods and every seed). group: "few" etc., or all."""
    diffs = np.mean(
        [_correct(d, method, group) - _correct(d, baseline, group) for d in run_dirs], axis=0
    )  # per image: the mean over seeds of (method right) - (baseline right)
    if diffs.size == 0:
        raise ValueError(f"no test images in group {group!r}")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for i in range(resamples):  # a loop of (N,) draws: (resamples, N) at once would be GBs for big tests
        means[i] = diffs[rng.integers(0, diffs.size, diffs.size)].mean()
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"diff": float(diffs.mean()), "lo": float(lo), "hi": float(hi), "images": int(diffs.size)}


def _baseline_scores(methods: dict[str, Any], metric: str) -> dict[str, float]:
    """Each baseline's mean test `metric`, where it has one (a skipped method has none)."""
    return {name: m[metric] for name, m in methods.items() if name in BASELINES and m.get(metric) is not None}


def best_baseline(methods: dict[str, Any], metric: str = "top1") -> str | None:
    """The baseline with the highest mean test `metric` (ties: the later name)."""
    scored = [(value, name) for name, value in _baseline_scores(methods, metric).items()]
    return max(scored)[1] if scored else None


def strongest_baseline(methods: dict[str, Any]) -> str | None:
    """The baseline with the highest mean test top-1 (the one RetFormer has to beat)."""
    return best_baseline(methods, "top1")


def _bootstrap_or_none(run_dirs: list[Path], baseline: str, group: str | None) -> dict[str, float] | None:
    try:
        return paired_bootstrap(run_dirs, "retformer", baseline, group)
    except (ValueError, FileNotFoundError):
        return None


def baselines_above(methods: dict[str, Any], metric: str) -> list[str]:
    """The baselines whose mean test `metric` is above RetFormer's (where RetFormer is not >= all)."""
    own = methods.get("retformer", {}).get(metric)
    if own is None:
        return []
    return sorted(name for name, value in _baseline_scores(methods, metric).items() if value > own)


def comparison(run_dirs: list[Path], methods: dict[str, Any]) -> dict[str, Any] | None:
    """RetFormer minus the strongest baseline (top-1), top-1 and few, with paired bootstrap intervals;
    `few_best`: the same against the best baseline on few where that is another one (a vote over a
    tail-heavy KB can lead on few while far under on top-1: both columns show the trade); `above`: per
    column the baselines whose mean is above RetFormer's."""
    if "retformer" not in methods or methods["retformer"].get("top1") is None:
        return None
    best = strongest_baseline(methods)
    if best is None:
        return None
    out: dict[str, Any] = {"method": "retformer", "baseline": best, "seeds": len(run_dirs)}
    for group in (None, "few"):
        out[group or "top1"] = _bootstrap_or_none(run_dirs, best, group)
    few_best = best_baseline(methods, "few")
    if few_best is not None and few_best != best:
        out["few_best"] = {
            "baseline": few_best,
            "few": _bootstrap_or_none(run_dirs, few_best, "few"),
            "top1": _bootstrap_or_none(run_dirs, few_best, None),
        }
    out["above"] = {metric: baselines_above(methods, metric) for metric in ("top1", "few")}
    return out


def _points(c: dict[str, float]) -> str:
    return f"{100 * c['diff']:+.2f} [{100 * c['lo']:+.2f}, {100 * c['hi']:+.2f}]"


def comparison_line(cmp: dict[str, Any] | None) -> str | None:
    """Console lines: RetFormer minus the strongest baseline, in points, with the 95% intervals; then the
    same against the best baseline on few where that is another one, and the baselines above RetFormer."""
    if not cmp:
        return None
    seeds = f"{cmp['seeds']} seed{'s' if cmp['seeds'] > 1 else ''}"
    parts = [f"{key} {_points(cmp[key])}" for key in ("top1", "few") if cmp.get(key)]
    lines = [
        f"RetFormer - {cmp['baseline']} (strongest baseline), {seeds}, paired bootstrap 95%: "
        + "; ".join(parts)
    ]
    few_best = cmp.get("few_best")
    if few_best:
        parts = [f"{key} {_points(few_best[key])}" for key in ("few", "top1") if few_best.get(key)]
        lines.append(f"RetFormer - {few_best['baseline']} (best baseline on few): " + "; ".join(parts))
    above = cmp.get("above")
    if above is not None:
        said = [f"{metric}: {', '.join(names) or 'none'}" for metric, names in above.items()]
        lines.append("baselines whose mean is above RetFormer's: " + "; ".join(said))
    return "\n".join(lines)
