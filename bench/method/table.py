"""Print the val / test table of a final__*.json (python table.py results/final__*.json)."""

import json
import sys

for path in sys.argv[1:]:
    d = json.load(open(path))
    print(f"\n{d['dataset']} with KB {d['kb']}")
    print(
        f"{'method':18s} {'selected':48s} {'val top1/few':>14s} {'test top1/many/med/few':>26s} "
        f"{'test shuffled top1/few':>22s}"
    )
    for name, row in d["table"].items():
        if "skipped" in row:
            print(f"{name:18s} skipped: {row['skipped']}")
            continue
        sel = {
            k: (round(v, 3) if isinstance(v, float) else v) for k, v in row["selected"].items() if k != "opts"
        }
        v, t = row["val"]["plain"], row["test"]["plain"]
        sh = row["test"].get("shuffled")
        shs = f"{sh['top1']:.1f} / {sh['few']:.1f}" if sh else "-"
        print(
            f"{name:18s} {str(sel):48s} {v['top1']:6.1f} / {v['few']:5.1f} "
            f"{t['top1']:6.1f} / {t['many']:5.1f} / {t['medium']:5.1f} / {t['few']:5.1f} {shs:>22s}"
        )
