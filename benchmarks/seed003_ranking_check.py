"""How well do `transferlab rank`'s scores predict the accuracy measured by a study? (issue 16, part 3)

Reads the finished runs of `studies/seed003_offline_fmnist.yaml` (frozen backbone + MLP head, the "probe"
accuracy; optionally a second runs folder with a fine-tune of the same candidates) and one or more
`transferlab rank --json` files of the same candidates, and prints, as markdown tables:

1. per candidate (backbone:weights): each rank score (the mean over the rank files given, e.g. one per
   rank seed) and the measured test accuracy, mean ± std over the study's seeds;
2. Spearman's rho between each score and each measured accuracy, across all candidates and across the
   pretrained ones only (without the random-init control, which every score is expected to put last).

    .venv/bin/python benchmarks/seed003_ranking_check.py \
        --runs /tmp/seed003/runs/seed003_offline_fmnist \
        --finetune-runs /tmp/seed003/runs/seed003_offline_fmnist_finetune \
        --rank /tmp/seed003/rank.seed0.json /tmp/seed003/rank.seed1.json /tmp/seed003/rank.seed2.json

The test accuracy is only compared with the scores here, never used to choose anything. With 4 (or 3)
candidates rho can take only a few values (n = 3: -1, -0.5, 0.5, 1), so one swap moves it a lot; the
p-values are printed for that reason.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from scipy.stats import spearmanr

SCORE_NAMES = {"logme": "LogME", "knn": "k-NN val acc", "logistic": "logistic val acc"}


def measured(runs_dir: Path) -> dict[str, list[float]]:
    """candidate ('backbone:weights') -> test accuracies of its finished runs (one per seed)."""
    out: dict[str, list[float]] = {}
    files = sorted(runs_dir.glob("*/metrics.json"))
    if not files:
        sys.exit(f"no */metrics.json under {runs_dir}")
    for f in files:
        m = json.loads(f.read_text())
        if m.get("status") != "ok" or m.get("test_acc") is None:
            print(f"skipped (status {m.get('status')}): {f.parent.name}", file=sys.stderr)
            continue
        out.setdefault(f"{m['backbone']}:{m['weights']}", []).append(float(m["test_acc"]))
    return out


def rank_scores(paths: list[Path]) -> tuple[dict[str, dict[str, list[float]]], list[str]]:
    """candidate -> score name -> values (one per rank file), and the score names in order."""
    out: dict[str, dict[str, list[float]]] = {}
    names: list[str] = []
    for p in paths:
        r = json.loads(p.read_text())
        names = names or list(r["scores"])
        for row in r["ranking"]:
            cand = f"{row['backbone']}:{row['weights']}"
            for s, v in row["scores"].items():
                out.setdefault(cand, {}).setdefault(s, []).append(float(v))
    return out, names


def mean_std(v: list[float]) -> str:
    if not v:
        return "not measured"
    if len(v) == 1:
        return f"{100 * v[0]:.2f} % (n=1)"
    return f"{100 * statistics.mean(v):.2f} % ± {100 * statistics.stdev(v):.2f} (n={len(v)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=Path, required=True, help="runs folder of the probe study (runs/<study>)")
    ap.add_argument("--finetune-runs", type=Path, help="runs folder of a fine-tune study of the same candidates")
    ap.add_argument("--rank", type=Path, nargs="+", required=True, help="transferlab rank --json output(s)")
    args = ap.parse_args()

    targets = {"probe test acc": measured(args.runs)}
    if args.finetune_runs:
        targets["fine-tune test acc"] = measured(args.finetune_runs)
    scores, names = rank_scores(args.rank)
    cands = [c for c in scores if c in targets["probe test acc"]]
    missing = sorted(set(scores) ^ set(targets["probe test acc"]))
    if missing:
        print(f"in only one of rank / runs (left out): {', '.join(missing)}", file=sys.stderr)
    smean = {c: {s: statistics.mean(scores[c][s]) for s in names} for c in cands}
    tmean = {t: {c: statistics.mean(v[c]) for c in cands if v.get(c)} for t, v in targets.items()}

    n_rank = len(args.rank)
    print(f"Candidates (scores: mean over {n_rank} rank file(s); accuracies: mean ± std over the study's seeds)\n")
    print("| candidate | " + " | ".join(SCORE_NAMES.get(s, s) for s in names) + " | " + " | ".join(targets) + " |")
    print("|---" * (1 + len(names) + len(targets)) + "|")
    for c in sorted(cands, key=lambda c: -smean[c][names[0]]):
        cells = [f"{smean[c][s]:.4f}" for s in names] + [mean_std(targets[t].get(c, [])) for t in targets]
        print(f"| {c} | " + " | ".join(cells) + " |")

    pretrained = [c for c in cands if not c.endswith(":scratch")]
    print("\nSpearman's rho between score and measured accuracy (candidate means), p-value in brackets\n")
    print("| score | measured | rho, all candidates | rho, pretrained only |")
    print("|---|---|---|---|")
    for s in names:
        for t in targets:
            cells = []
            for group in (cands, pretrained):
                group = [c for c in group if c in tmean[t]]
                if len(group) < 3:
                    cells.append(f"n={len(group)}, not computed")
                    continue
                rho, p = spearmanr([smean[c][s] for c in group], [tmean[t][c] for c in group])
                cells.append(f"{rho:+.2f} ({p:.2f}), n={len(group)}")
            print(f"| {SCORE_NAMES.get(s, s)} | {t} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
