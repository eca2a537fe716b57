"""How well caption labels (`kb_episode_labels: caption`) match a KB's own labels: per store item, the class
its caption names (`trainer.kb_episodes.caption_labels`, read by the KB's text tower) against the `label`
the KB holds; prints how many items name a class, how many agree, and the commonest (KB label, caption
label) pairs (-1: names no class).

    python bench/method/caption_labels.py WORKDIR DATASET KB K KB_MANIFEST
    python bench/method/caption_labels.py /tmp/own/work mine mine_world 32 \\
        /tmp/own/manifests/kb/mine_world.yaml
"""

import json
import sys
from collections import Counter
from pathlib import Path

import yaml

from retformer.artifacts.workspace import Workspace
from retformer.kb_builder.encoders import build_text_encoder
from retformer.kb_builder.kb_schema import validate_kb
from retformer.trainer.evidence import class_text_embeddings
from retformer.trainer.features import load_retrieval_features
from retformer.trainer.kb_episodes import caption_labels

root, dataset, kb, k, kb_manifest = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
ws = Workspace(root)
spec = validate_kb(yaml.safe_load(Path(kb_manifest).read_text()), kb)
names = json.loads(ws.dataset_info(dataset).read_text())["class_names"]
store = load_retrieval_features(ws, dataset, kb, k, "train")
named = caption_labels(store.store_txt, class_text_embeddings(build_text_encoder(spec.encoders.text), names))
kb_label = store.store_label.numpy()
print("classes", names)
print(
    "store",
    len(kb_label),
    "named a class",
    int((named >= 0).sum()),
    "agree",
    int(((named == kb_label) & (named >= 0)).sum()),
)
print(
    "(KB label, caption label):", Counter(zip(kb_label.tolist(), named.tolist(), strict=True)).most_common(20)
)
