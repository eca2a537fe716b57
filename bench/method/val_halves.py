"""A copy of a demo workspace whose val split is also cut into two stratified halves, `vala` / `valb`:
a 2-fold check of a selection procedure on val alone (issue 18, docs/method-notes.md "third round").
Files are copied with their times
(the stages refuse a shard outside the workspace and compare shard fingerprints); the copy's
dataset.json and neighbour records list the two new splits.

    python bench/method/val_halves.py /tmp/demo_final /tmp/vcv/ws fmnist_lt digits_lt fmnist_lt_noisy

then, per dataset, fold and rule fit, the experiment in Python (the CLI's stage checks refuse a split
that has no shards of its own):

    from pathlib import Path
    from retformer.artifacts.workspace import Workspace
    from retformer.pipelines import stages
    from retformer.pipelines.experiment import run_experiment

    sets = ["experiment.select_split=vala", "experiment.eval_split=valb", "experiment.select.rule_fit=stack"]
    exp = stages.load_experiment("demo", sets)
    ds, kb = stages.load_dataset_manifest("fmnist_lt", None), stages.load_kb("fmnist_world", None)
    report = run_experiment(Workspace(Path("/tmp/vcv/ws")), ds, kb, exp, Path("/tmp/vcv/run"), progress=False)
    report["methods"]["retformer"]["top1"]  # balanced halves: the out-of-half balanced accuracy
"""

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
datasets = sys.argv[3:]
dst.mkdir(parents=True, exist_ok=True)
if not (dst / "kb").exists():
    shutil.copytree(src / "kb", dst / "kb", symlinks=False, copy_function=shutil.copy2)
for ds in datasets:
    s, d = src / "datasets" / ds, dst / "datasets" / ds
    if d.exists():
        shutil.rmtree(d)
    for root, _dirs, files in os.walk(s):
        rel = Path(root).relative_to(s)
        (d / rel).mkdir(parents=True, exist_ok=True)
        for f in files:
            p = Path(root) / f
            shutil.copy2(p, d / rel / f)
    emb = pq.read_table(next((s / "embeddings" / "val").glob("*.parquet")))
    y = np.asarray(emb.column("label").to_numpy())
    rng = np.random.default_rng(0)
    half = np.zeros(len(y), bool)
    for c in np.unique(y):
        idx = rng.permutation(np.nonzero(y == c)[0])
        half[idx[: len(idx) // 2]] = True
    uids = set(np.asarray(emb.column("uid").to_pylist(), dtype=object)[half])
    info = json.loads((d / "dataset.json").read_text())
    for name, mask in (("vala", half), ("valb", ~half)):
        (d / "embeddings" / name).mkdir(parents=True, exist_ok=True)
        pq.write_table(emb.filter(mask), d / "embeddings" / name / f"part-{name}-00000.parquet")
        for nn in (s / "neighbors").glob("*/k32"):
            t = pq.read_table(nn / "val.parquet")
            m = np.array([u in uids for u in t.column("uid").to_pylist()])
            out = d / "neighbors" / nn.parent.name / "k32"
            pq.write_table(t.filter(m if name == "vala" else ~m), out / f"{name}.parquet")
            meta = json.loads((out / "_neighbors.json").read_text())
            if "split_keys" in meta:
                meta["split_keys"][name] = meta["split_keys"]["val"]
                (out / "_neighbors.json").write_text(json.dumps(meta))
        info["split_sizes"][name] = int(mask.sum())
        info["splits"][name] = int(mask.sum()) if isinstance(info["splits"], dict) else None
    (d / "dataset.json").write_text(json.dumps(info))
    print(ds, {k: v for k, v in info["split_sizes"].items()})
