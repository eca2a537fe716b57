"""New knowledge without retraining, measured on the demo data (issue 19, item 3).

digits_lt x digits_world (pipelines/demo.py's second pair), in one workdir:

1. thin: digits_world's shards rewritten as a webdataset KB `digits_world_thin` that keeps only
   --keep (default 10%) of the images whose true class is a few-shot class of digits_lt (7, 8, 9:
   < 10 training images); the removed images go to a shard set `zz-new-*.tar` kept aside;
2. train once on the thin KB (the demo experiment: every choice on val) -> run A;
3. grow + evaluate, timed: the new shards join the thin KB's source, `embed` embeds only them,
   `index` adds them to the index in place, `evaluate A --kb digits_world_thin` recomputes the test
   split's neighbours and evaluates A's models (no training);
4. irrelevant KB: A evaluated with `fmnist_world_2k` (2,000 Fashion-MNIST world images, the same
   encoders): clothes for digits;
5. rebuild + retrain, timed: the grown source as a new KB embedded, indexed, neighboured and trained
   from scratch (run B): what a KB update costs without this feature.

Writes --out (JSON: the table, times, runs) and prints the table. ~15 min on 2 shared CPU cores.

    python bench/bench_kb_update.py --workdir /tmp/kb_update --out bench/results/kb_update.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retformer.artifacts.atomic import write_json_atomic  # noqa: E402
from retformer.artifacts.shards import Sample, list_shards, read_shard, write_shards  # noqa: E402
from retformer.artifacts.workspace import Workspace, read_json  # noqa: E402
from retformer.pipelines import stages  # noqa: E402
from retformer.pipelines.dask_target import DaskTarget  # noqa: E402
from retformer.pipelines.evaluate_kb import stage_evaluate_kb  # noqa: E402

DATASET, WORLD, EXPERIMENT = "digits_lt", "digits_world", "demo"
THIN, FULL, IRRELEVANT = "digits_world_thin", "digits_world_full", "fmnist_world_2k"
ROWS = ("retformer", "retformer:shuffled", "mlp_only", "knn_vote")


def _samples(shards: list[Path]):
    for shard in shards:
        for rec in read_shard(shard):
            meta = {k: v for k, v in (rec["meta"] or {}).items() if k not in ("uid", "label", "source")}
            yield Sample(rec["uid"], rec["image_bytes"], rec["caption"], rec["label"], rec["source"], meta)


def split_world(ws: Workspace, few: list[int], keep: float, src: Path, aside: Path, seed: int) -> dict:
    """digits_world's samples: the thin set into `src` (base-*.tar), the removed tail images into
    `aside` (zz-new-*.tar: they sort after the base shards, so they append kb_ids)."""
    import numpy as np

    world = [s for s in _samples(list_shards(ws.kb_shards(WORLD)))]
    rng = np.random.default_rng(seed)
    tail = [i for i, s in enumerate(world) if int((s.meta or {}).get("true_label", -1)) in few]
    removed = set(rng.choice(tail, size=len(tail) - int(round(keep * len(tail))), replace=False).tolist())
    base = [s for i, s in enumerate(world) if i not in removed]
    new = [s for i, s in enumerate(world) if i in removed]
    write_shards(base, src, "base", 2500)
    write_shards(new, aside, "zz-new", 2500)
    return {"world": len(world), "tail": len(tail), "thin": len(base), "added": len(new)}


def kb_manifest(path: Path, name: str, src: Path) -> Path:
    world = stages.load_kb(WORLD, None)
    data = {
        "name": name,
        "description": f"{WORLD} as webdataset shards under {src}",
        "source": {"kind": "webdataset", "path": str(src)},
        "encoders": world.as_loaded()["encoders"],
        "embed": world.as_loaded()["embed"],
        "index": world.as_loaded()["index"],
    }
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def irrelevant_manifest(path: Path) -> Path:
    data = yaml.safe_load(Path("manifests/kb/fmnist_world.yaml").read_text())
    data["name"] = IRRELEVANT
    data["source"]["size"] = 2000
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def figures(report: dict) -> dict:
    out = {}
    for name in ROWS:
        row = report["methods"].get(name, {})
        out[name] = (
            {"skipped": row["skipped"]}
            if "skipped" in row
            else {m: round(100 * row[m], 2) for m in ("top1", "few") if row.get(m) is not None}
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/kb_update"))
    ap.add_argument("--keep", type=float, default=0.1, help="fraction of few-shot-class images kept")
    ap.add_argument("--out", type=Path, default=Path("bench/results/kb_update.json"))
    args = ap.parse_args()
    started = time.perf_counter()
    ws = Workspace(args.workdir)
    man = args.workdir / "manifests"
    man.mkdir(parents=True, exist_ok=True)
    ds = stages.load_dataset_manifest(DATASET, None)
    exp = stages.load_experiment(EXPERIMENT, None)
    world = stages.load_kb(WORLD, None)
    stages.stage_shards(ws, world, ds, None)
    info = read_json(ws.dataset_info(DATASET))
    few = list(info["shot_split"]["few"])  # class ids with < 10 training images (7, 8, 9)
    src, aside = args.workdir / "sources" / THIN, args.workdir / "sources" / "new"
    counts = split_world(ws, few, args.keep, src, aside, seed=0)
    thin = stages.load_kb(str(kb_manifest(man / f"{THIN}.yaml", THIN, src)), None)
    times: dict[str, float] = {}

    # 1. train once with the thin KB
    t0 = time.perf_counter()
    stages.stage_embed(ws, thin, ds, None, dask=DaskTarget(workers=1))
    stages.stage_index(ws, thin)
    stages.stage_neighbors(ws, ds, thin)
    run_a = stages.stage_train(ws, ds, thin, exp)
    times["thin: embed + index + neighbors + train"] = round(time.perf_counter() - t0, 1)
    thin_rows = read_json(ws.kb_index(THIN) / "index.json")["n"]

    # 2. grow in place + evaluate the same run
    t0 = time.perf_counter()
    for shard in sorted(aside.glob("*.tar")):
        shutil.copy2(shard, src / shard.name)
    stages.stage_embed(ws, thin, None, None, dask=DaskTarget(workers=1))
    grow_rec = stages.stage_index(ws, thin)
    _, grown = stage_evaluate_kb(ws, run_a["run"], str(man / f"{THIN}.yaml"))
    times["grow + evaluate"] = round(time.perf_counter() - t0, 1)

    # 3. an irrelevant KB (the same encoders)
    irr = stages.load_kb(str(irrelevant_manifest(man / f"{IRRELEVANT}.yaml")), None)
    t0 = time.perf_counter()
    stages.stage_embed(ws, irr, None, None, dask=DaskTarget(workers=1))
    stages.stage_index(ws, irr)
    _, irrelevant = stage_evaluate_kb(ws, run_a["run"], str(man / f"{IRRELEVANT}.yaml"))
    times["irrelevant KB: embed + index + evaluate"] = round(time.perf_counter() - t0, 1)

    # 4. rebuild + retrain: the grown source as a KB built from scratch, a new run
    full = stages.load_kb(str(kb_manifest(man / f"{FULL}.yaml", FULL, src)), None)
    t0 = time.perf_counter()
    stages.stage_embed(ws, full, None, None, dask=DaskTarget(workers=1))
    stages.stage_index(ws, full)
    stages.stage_neighbors(ws, ds, full)
    run_b = stages.stage_train(ws, ds, full, exp)
    times["rebuild + retrain"] = round(time.perf_counter() - t0, 1)

    table = [
        {"run": "A", "trained with": THIN, "evaluated with": f"{THIN} ({thin_rows} rows)", **figures(run_a)},
        {
            "run": "A",
            "trained with": THIN,
            "evaluated with": f"{THIN} grown in place ({grown['kb_index']['n']} rows)",
            **figures(grown),
        },
        {
            "run": "A",
            "trained with": THIN,
            "evaluated with": f"{IRRELEVANT} ({irrelevant['kb_index']['n']} rows, Fashion-MNIST)",
            **figures(irrelevant),
        },
        {
            "run": "B",
            "trained with": FULL,
            "evaluated with": f"{FULL} (rebuilt, retrained)",
            **figures(run_b),
        },
    ]
    record = {
        "command": " ".join(sys.argv),
        "counts": counts,
        "few_shot_classes": few,
        "runs": {"A": run_a["run"], "B": run_b["run"]},
        "grow": {k: grow_rec.get(k) for k in ("factory", "grown", "rebuilt", "recall", "seconds")},
        "table": table,
        "seconds": times,
        "wall_s": round(time.perf_counter() - started, 1),
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json_atomic(args.out, record)
    for row in table:
        cells = "  ".join(
            f"{m} {row[m].get('top1', '-')}/{row[m].get('few', '-')}"
            if "skipped" not in row[m]
            else f"{m} skipped"
            for m in ROWS
        )
        print(f"{row['run']} {row['trained with']} -> {row['evaluated with']}: {cells}")
    print(json.dumps(times))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
