"""How well caption labels (`kb_episode_labels: caption`) match a KB's own labels: per store item, the class
its caption names (`trainer.kb_episodes.caption_labels`, read by the KB's text tower) against the `label`
the KB holds; prints how many items name a class, how many agree, and the commonest (KB label, caption
label) pairs (-1: names no class), read centred (as the trainer does) and uncentred (as before 2026-12-07).

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
from retformer.trainer.config import CAPTION_NULL
from retformer.trainer.evidence import ClassText, caption_centre, class_text_embeddings
from retformer.trainer.features import load_retrieval_features
from retformer.trainer.kb_episodes import caption_labels

root, dataset, kb, k, kb_manifest = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
ws = Workspace(root)
spec = validate_kb(yaml.safe_load(Path(kb_manifest).read_text()), kb)
names = json.loads(ws.dataset_info(dataset).read_text())["class_names"]
store = load_retrieval_features(ws, dataset, kb, k, "train")
prompts = class_text_embeddings(build_text_encoder(spec.encoders.text), names)
kb_label = store.store_label.numpy()
print("classes", names)
# Centred (what the trainer reads: evidence.ClassText with the store's mean caption), then uncentred with
# the null cosine of before (0.0) for comparison.
for tag, reader, null in [
    ("centred", ClassText(prompts, caption_centre(store.store_txt)), CAPTION_NULL),
    ("uncentred, null 0.0", prompts, 0.0),
]:
    named = caption_labels(store.store_txt, reader, null=null)
    print(
        tag,
        "store",
        len(kb_label),
        "named a class",
        int((named >= 0).sum()),
        "agree",
        int(((named == kb_label) & (named >= 0)).sum()),
    )
    pairs = Counter(zip(kb_label.tolist(), named.tolist(), strict=True))
    wrong = [(pair, n) for pair, n in pairs.most_common() if pair[0] != pair[1]]
    print("  (KB label, caption label) that disagree:", wrong[:10])
