"""The two tables of experiments/real_data.md §6 (RDDN's references), read from the run
directories under logs/experiments/ (each job's metrics.csv, train.log and the log file
``/usr/bin/time -v`` wrote beside it):

    python experiments/rddn_references_table.py

A job's run directory stays on the machine that ran it (``logs/`` is not in the repository);
the table lists the jobs whose directories are present, and compares with the baseline only
where the baseline's are.
"""

import csv
import re
import statistics
from pathlib import Path

L = Path(__file__).resolve().parents[1] / "logs" / "experiments"
CLASSES = [
    "water_mark",
    "broken_hole",
    "stained",
    "insect",
    "seam_allowance",
    "misprint",
    "broken_pattern",
    "knots",
    "crease_mark",
]
ROWS = ["baseline", "pre", "inter", "post", "postrescore", "ptg", "context"]
LABEL = {"postrescore": "post, the baseline's checkpoint rescored"}


def test_metrics(d):
    met = list(d.glob("csv/*/metrics.csv"))
    if not met:
        return None, []
    with open(met[0], newline="") as f:
        recs = list(csv.DictReader(f))
    test = [r for r in recs if r.get("test/map_50")]
    return (test[-1] if test else None), recs


def wall_rss(log):
    text = log.read_text(errors="replace")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", text).group(1)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1)) / 1e6
    mm, ss = wall.split(":")[0], wall.split(":")[1].split(".")[0]
    return f"{int(mm)} min {int(ss):02d} s", rss


runs = []
for d in sorted(L.glob("rddn_references_*")):
    if not d.is_dir() or d.name.endswith("_stopped"):
        continue
    m = re.match(r"rddn_references_(?:(pilot)|(\w+?)_seed(\d+))_([0-9a-f]{7})$", d.name)
    if not m:
        continue
    row, seed, commit = (
        ("baseline", 42, m.group(4)) if m.group(1) else (m.group(2), int(m.group(3)), m.group(4))
    )
    t, recs = test_metrics(d)
    if t is None:
        continue
    val = [float(r["val/map_50"]) for r in recs if r.get("val/map_50")]
    wall, rss = wall_rss(L / f"{d.name}.log")
    log = d / "train.log"
    ips = (
        [
            float(x[1])
            for x in re.findall(
                r"train epoch \d+/\d+: step (\d+)/\1, \S+, ([\d.]+) images/s", log.read_text()
            )
        ]
        if log.exists()
        else []
    )
    ckpt = (
        sorted(p.name for p in (d / "checkpoints").glob("epoch_*.ckpt"))
        if (d / "checkpoints").exists()
        else []
    )
    best = int(ckpt[0][6:9]) + 1 if ckpt else None
    if best is None:  # a test-only run: the epoch of the checkpoint it was given
        m_ck = re.search(
            r"ckpt_path=\S*epoch_(\d{3})\.ckpt", (L / f"{d.name}.log").read_text(errors="replace")
        )
        best = int(m_ck.group(1)) + 1 if m_ck else None
    runs.append(
        dict(
            row=row,
            seed=seed,
            commit=commit,
            val=val,
            map50=float(t["test/map_50"]),
            map=float(t["test/map"]),
            mar=float(t["test/mar_100"]),
            per={k: float(t[f"test/ap_50/{k}"]) for k in CLASSES},
            wall=wall,
            rss=rss,
            ips=ips,
            best=best,
        )
    )
runs.sort(key=lambda r: (ROWS.index(r["row"]), [42, 1, 2].index(r["seed"])))
print(
    "| row | seed | commit | val mAP@0.5 after epochs 1–6 | tested epoch | test mAP@0.5 | test mAP@[.5:.95] | test mAR@100 | wall | train images/s | peak RSS |"
)
print("|---|---:|---|---|---:|---:|---:|---:|---|---|---:|")
for r in runs:
    if r["ips"]:
        lo, hi = min(r["ips"]), max(r["ips"])
        ips = f"{lo:.1f}" if f"{lo:.1f}" == f"{hi:.1f}" else f"{lo:.1f}–{hi:.1f}"
    else:
        ips = "—"
    val = " / ".join(f"{v:.3f}" for v in r["val"]) or "— (test only)"
    print(
        f"| {LABEL.get(r['row'], r['row'])} | {r['seed']} | `{r['commit']}` | {val} | {r['best'] or '—'} | **{r['map50']:.4f}** | {r['map']:.4f} | {r['mar']:.4f} | {r['wall']} | {ips} | {r['rss']:.1f} GB |"
    )
print()
base = [r["map50"] for r in runs if r["row"] == "baseline"]
bseed = {r["seed"]: r["map50"] for r in runs if r["row"] == "baseline"}


def verdict_of(v, b):
    if len(v) < 2:
        return "one seed"
    if min(v) > max(b):
        return "above"
    if max(v) < min(b):
        return "below"
    return "no (ranges overlap)"


def spread(v):
    if len(v) > 1:
        return f"{statistics.mean(v):.4f} ± {statistics.stdev(v):.4f} ({min(v):.4f} – {max(v):.4f})"
    return f"{v[0]:.4f}"


print(
    "| row | seeds | test mAP@0.5 mean ± std (min – max) | Δ mean vs baseline | Δ vs the baseline at the same seed (42 / 1 / 2) | beyond the seed spread? | mAP@[.5:.95] mean ± std | "
    + " | ".join(CLASSES)
    + " |"
)
print("|---|---:|---|---:|---|---|---|" + "---:|" * len(CLASSES))
for row in ROWS:
    g = [r for r in runs if r["row"] == row]
    if not g:
        continue
    v = [r["map50"] for r in g]
    w = [r["map"] for r in g]
    per = " | ".join(f"{statistics.mean(r['per'][k] for r in g):.3f}" for k in CLASSES)
    paired = " / ".join(
        f"{r['map50'] - bseed[r['seed']]:+.4f}".replace("-", "−") if r["seed"] in bseed else "—" for r in g
    )
    if row == "baseline" or not base:  # no baseline run directory here: nothing to compare with
        delta, verdict, paired = "—", "—", "—"
    else:
        delta = f"{statistics.mean(v) - statistics.mean(base):+.4f}".replace("-", "−")
        verdict = verdict_of(v, base)
    m50 = spread(v)
    mm = f"{statistics.mean(w):.4f} ± {statistics.stdev(w):.4f}" if len(w) > 1 else f"{w[0]:.4f}"
    print(f"| {LABEL.get(row, row)} | {len(g)} | {m50} | {delta} | {paired} | {verdict} | {mm} | {per} |")
