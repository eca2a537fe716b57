import json
import sys

for line in open(sys.argv[1]):
    r = json.loads(line)
    if "history" not in r:
        print(r)
        continue
    h = r["history"]
    pts = sorted(set([0, 4, 9, 19, len(h) // 2, len(h) - 1]))
    traj = " ".join(
        f"e{h[i]['epoch']}:{h[i]['a0']:.0f}/{h[i]['r_only']:.0f}/{h[i]['a1']:.0f}" for i in pts if i < len(h)
    )
    print(
        r["exp"],
        "sel",
        r["selected_rule"],
        "ep",
        r["epoch"],
        "val",
        r["val"],
        "shuf",
        r["val_shuffled"]["top1"],
        r["val_shuffled"]["few"],
        "\n   best/rule",
        r["best_per_rule"],
        "\n   I/R/sum",
        traj,
        "\n   attn",
        {k: v for k, v in r["attention"].items() if "L0" in k},
        r["seconds"],
        "s",
    )
