"""Pick a PPO checkpoint on the VALIDATION behaviours, never on the test set.

    loopchat eval behaviours --items loopchat/data/bundled/eval/behaviours-val.jsonl \
        --model runs/sft-v3/final --compare runs/ppo-v8/checkpoint-16 --compare ... --out runs/val
    python scripts/pick_checkpoint.py --baseline runs/val/behaviours-sft-v3_final.json runs/val/behaviours-*.json

The rule is the issue's done-when, applied to validation results: a candidate is ranked by
(1) the number of categories where it is at least as good as the baseline, (2) the number
where it is strictly better, (3) its total passes; a candidate that refuses more harmless
prompts than the baseline is ranked last. Only the chosen checkpoint then goes to the test
set (loopchat/data/bundled/eval/behaviours.jsonl), once.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(path: str) -> dict:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or "summary" not in data:
        raise SystemExit(f"{path}: not a behaviours results file (no 'summary')")
    return data


def rank_key(cand: dict, base: dict) -> tuple:
    cb, bb = cand["summary"]["by_category"], base["summary"]["by_category"]
    cats = sorted(bb)
    missing = [c for c in cats if c not in cb]
    if missing:
        raise SystemExit(f"{cand['model']}: no results for categories {missing}")
    at_least = sum(cb[c]["passed"] >= bb[c]["passed"] for c in cats)
    better = sum(cb[c]["passed"] > bb[c]["passed"] for c in cats)
    no_more_refusals = cand["summary"]["refusal_rate"] <= base["summary"]["refusal_rate"]
    return (no_more_refusals, at_least, better, cand["summary"]["passed"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", required=True, help="the SFT model's validation results JSON")
    ap.add_argument("candidates", nargs="+", help="validation results JSON of the candidate checkpoints")
    a = ap.parse_args()
    base = load(a.baseline)
    cands = [load(p) for p in a.candidates if Path(p).resolve() != Path(a.baseline).resolve()]
    if not cands:
        raise SystemExit("no candidates besides the baseline")
    cats = list(base["summary"]["by_category"])
    print(f"{'model':34s} " + " ".join(f"{c[:7]:>7s}" for c in cats) + "   >=   >  total  harmless-refusals")
    for d in [base, *cands]:
        bc = d["summary"]["by_category"]
        k = rank_key(d, base)
        print(f"{d['model'][-34:]:34s} " + " ".join(f"{bc[c]['passed']:7d}" for c in cats)
              + f" {k[1]:4d} {k[2]:3d} {k[3]:6d}  {d['summary']['refusal_rate']:.2f}")
    best = max(cands, key=lambda d: rank_key(d, base))
    print(f"\nchosen: {best['model']}  (>= baseline on {rank_key(best, base)[1]}/{len(cats)} categories, better on {rank_key(best, base)[2]})")


if __name__ == "__main__":
    main()
