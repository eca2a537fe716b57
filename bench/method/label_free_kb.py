"""A KB of web pairs made from a built world KB: the same images and captions as webdataset shards whose
json keeps the uid and drops `label` / `true_label`, as img2dataset's output has no label. What the
own-data path does where the KB has captions only (the paper's setting): knn_vote is skipped, the
evidence is what the captions name, and KB episodes come from captions or not at all.

    python bench/method/label_free_kb.py WORKDIR/kb/mine_world/shards /tmp/own  [NAME]   # NAME: mine_web
    RETFORMER_MANIFESTS=/tmp/own/manifests retformer demo --dataset mine --kb mine_web \\
        --workdir /tmp/own_web --seeds 3

Writes OUT/web_shards/*.tar and OUT/manifests/kb/NAME.yaml (the encoders of the world KB the shards came
from: OUT/manifests/kb/<world>.yaml, <world> the folder above `shards`).
"""

import io
import json
import sys
import tarfile
from pathlib import Path

import yaml

shards, out = Path(sys.argv[1]), Path(sys.argv[2])
name = sys.argv[3] if len(sys.argv) > 3 else "mine_web"
world_manifest = out / "manifests" / "kb" / f"{shards.parent.name}.yaml"
target = out / "web_shards"
target.mkdir(parents=True, exist_ok=True)
items = 0
for tar_path in sorted(shards.glob("*.tar")):
    partial = target / (tar_path.name + ".partial")
    with tarfile.open(tar_path) as src, tarfile.open(partial, "w") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()
            if member.name.endswith(".json"):
                meta = json.loads(data)
                data = json.dumps({"uid": meta["uid"]}).encode()
                items += 1
            info = tarfile.TarInfo(member.name)
            info.size, info.mtime = len(data), member.mtime
            dst.addfile(info, io.BytesIO(data))
    partial.rename(target / tar_path.name)
encoders = yaml.safe_load(world_manifest.read_text())["encoders"]
manifest = {"source": {"kind": "webdataset", "path": str(target)}, "encoders": encoders}
(out / "manifests" / "kb" / f"{name}.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
print(f"{items} items without labels in {target}; manifest {out / 'manifests' / 'kb' / (name + '.yaml')}")
