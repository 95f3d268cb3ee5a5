"""`loopchat eval rm` and `loopchat rm score`: how far to trust a reward model.

Held-out pairwise accuracy (overall and per category: does the model prefer the reply the
labeller ranked higher?) and a calibration plot: for each held-out pair, the model's
P(better) = sigmoid(r_better - r_worse) against how often that is right. InstructGPT's
reward models agreed with held-out labellers about 72% of the time.
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from pathlib import Path

from pydantic import Field

from loopchat.config import Config
from loopchat.data.formats import ranking_rows, read_file, sft_messages
from loopchat.train import reward as R


class RMEvalConfig(Config):
    reward: str = Field(..., description="reward model: an rm run folder or checkpoint")
    data: list[str] = Field(default_factory=list, description="ranking/preference files (default: the held-out split of the bundled comparisons)")
    out: str | None = Field(None, description="folder for rm_eval.json and calibration.png (default: <reward run>/eval)")
    max_seq_len: int = Field(1024, ge=16, description="longer rankings are skipped (counted)")
    batch_size: int = Field(16, ge=1, description="sequences scored together")


def pair_predictions(model, tok, items: list[R.RankItem], batch_size: int = 16) -> list[dict]:
    """For every pair of every ranking: P(better beats worse) = sigmoid(r_better - r_worse).
    Each reply is scored once, however many pairs it is in."""
    seqs = [it.prompt_ids + r for it in items for r in it.responses]
    scores = R.score_sequences(model, seqs, tok.pad_token_id, batch_size)
    out, k = [], 0
    for it in items:
        rs = scores[k : k + len(it.responses)]
        k += len(it.responses)
        for b, w in it.pairs:
            m = rs[b] - rs[w]
            out.append({"category": it.category or "all", "p_better": 1 / (1 + math.exp(-m)), "margin": m})
    return out


def accuracy_by_category(preds: list[dict]) -> dict[str, dict]:
    by: dict[str, list[float]] = defaultdict(list)
    for p in preds:
        by[p["category"]].append(p["margin"])
        by["ALL"].append(p["margin"])
    return {c: {"pairs": len(ms), "accuracy": sum(m > 0 for m in ms) / len(ms)} for c, ms in sorted(by.items())}


def calibration(preds: list[dict], bins: int = 10) -> list[dict]:
    """Reliability table. Each pair counts in both orientations, (p, 1) and (1 - p, 0), so
    the table covers [0, 1] and a perfectly calibrated model lies on the diagonal."""
    pts = [(p["p_better"], 1.0) for p in preds] + [(1 - p["p_better"], 0.0) for p in preds]
    table = []
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        sel = [(p, y) for p, y in pts if lo <= p < hi or (b == bins - 1 and p == 1.0)]
        if sel:
            table.append({"lo": lo, "hi": hi, "n": len(sel), "predicted": sum(p for p, _ in sel) / len(sel),
                          "observed": sum(y for _, y in sel) / len(sel)})
    return table


def expected_calibration_error(table: list[dict]) -> float:
    n = sum(t["n"] for t in table)
    return sum(t["n"] * abs(t["predicted"] - t["observed"]) for t in table) / max(n, 1)


def plot_calibration(table: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.plot([t["predicted"] for t in table], [t["observed"] for t in table], "o-", label="reward model")
    for t in table:
        ax.annotate(str(t["n"]), (t["predicted"], t["observed"]), fontsize=7, xytext=(3, -10), textcoords="offset points")
    ax.set(xlabel="predicted P(better)", ylabel="observed frequency", xlim=(0, 1), ylim=(0, 1), title=title)
    ax.legend(loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def heldout_items(tok, cfg: RMEvalConfig) -> list[R.RankItem]:
    rcfg = R.RMConfig(data=cfg.data, max_seq_len=cfg.max_seq_len)
    items, s = R.load_rankings(tok, rcfg)
    if not cfg.data:  # the bundled set: only its held-out split
        items = [it for it in items if it.split == "heldout"]
    if not items:
        raise ValueError(f"eval rm: no usable rankings in {', '.join(s.files)}" + (f" ({s.describe_skips()})" if s.skipped else ""))
    return items


def run_eval_rm(cfg: RMEvalConfig) -> dict:
    model, tok = R.load_reward_model(cfg.reward)
    items = heldout_items(tok, cfg)
    preds = pair_predictions(model, tok, items, cfg.batch_size)
    acc = accuracy_by_category(preds)
    table = calibration(preds)
    out = Path(cfg.out) if cfg.out else Path(R.resolve_reward_spec(cfg.reward)).parent / "eval"
    out.mkdir(parents=True, exist_ok=True)
    result = {"reward": cfg.reward, "rankings": len(items), "accuracy": acc, "calibration": table,
              "ece": expected_calibration_error(table)}
    (out / "rm_eval.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_calibration(table, out / "calibration.png", f"reward model calibration ({acc['ALL']['pairs']} held-out pairs)")
    print(f"{'category':<18}{'pairs':>7}{'accuracy':>10}")
    for c, v in acc.items():
        print(f"{c:<18}{v['pairs']:>7}{100 * v['accuracy']:>9.1f}%")
    print(f"expected calibration error {result['ece']:.3f}\nwrote {out / 'rm_eval.json'} and {out / 'calibration.png'}")
    return result


def score_file(reward: str, data: str, out=sys.stdout, batch_size: int = 16) -> list[dict]:
    """Rewards of every reply in a file: each response of a ranking/preference row, or the
    final assistant reply of each conversation. Prints one JSON line per reply."""
    model, tok = R.load_reward_model(reward)
    prompts, replies, where = [], [], []
    for n, rec in enumerate(read_file(data)):
        rows = list(ranking_rows(rec))
        if rows:
            for row in rows:
                for k, r in enumerate(row["responses"]):
                    prompts.append(row["prompt"]), replies.append(r), where.append({"record": n, "response": k, "rank": row["ranks"][k]})
        else:
            for path in sft_messages(rec):
                prompts.append(path[:-1]), replies.append(path[-1]["content"]), where.append({"record": n})
    if not replies:
        raise ValueError(f"{data}: no assistant replies to score")
    raw = R.score_replies(model, tok, prompts, replies, normalise=False, batch_size=batch_size)
    off = R.reward_offset(model)
    rows = [{**w, "reward": x - off, "raw": x, "reply": r[:80]} for w, x, r in zip(where, raw, replies)]
    for row in rows:
        out.write(json.dumps(row) + "\n")
    return rows
