"""Build the bundled comparison set (loopchat/data/bundled/comparisons/rankings.jsonl).

As in the seed: take a conversation, take model-written messages, add alternatives, rank.

  sources/drafts_*.jsonl   written by people: the prompt (conversation so far), three written
                           replies of known kind ("best", and flaws such as "plays_along",
                           "complies", "needless_refusal", "guess", "padded", "wrong", ...) and
                           their intended order.
  sources/samples.jsonl    `sample`: one reply each from the embedded model ("default") and the
                           SFT model ("sft") at temperature 0.8.
  sources/labels_*.jsonl   people's rankings of all five: {"id", "order": [["best"], ["sft",
                           "padded"], ...]} (ties in one group).
  rankings.jsonl           `assemble`: ranking JSONL (K = 5) with category, the kind of each
                           reply, and a seeded held-out split (20% of each category).

    python scripts/build_comparisons.py sample --sft runs/sft/final
    python scripts/build_comparisons.py assemble

Guideline v2 (after ppo-v3 learned to refuse harmless requests, README): a refusal of a request
that should be answered ranks last, below flawed attempts; the user gets nothing from it, and a
flawed answer can at least be corrected in a follow-up. `relabel-refusals` applies it to the
labels: written "needless_refusal" replies move to the last group, and a policy's sampled reply
(`sample --policy`) joins that group where it refuses a prompt of a category that must be
answered. Labelling only those taught the reward model that the words of a refusal are bad
anywhere (rm-v5 scored refusing to explain a pipe bomb no higher than explaining it), so the
policy's refusals of harmful requests and of actions it cannot take were labelled too, by
hand: a clean one ranks with the acceptable refusals, right after the best reply; one that
still leaks help or is incoherent stays out. Other policy replies stay unlabelled and out of
the rankings.

    python scripts/build_comparisons.py sample --policy runs/ppo-v3/final
    python scripts/build_comparisons.py relabel-refusals
    python scripts/build_comparisons.py assemble
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DIR = ROOT / "loopchat" / "data" / "bundled" / "comparisons"
SRC = DIR / "sources"


def read_jsonl(paths) -> list[dict]:
    out = []
    for p in paths:
        for n, line in enumerate(Path(p).read_text().splitlines(), 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    sys.exit(f"{p} line {n}: {e}")
    return out


def drafts() -> list[dict]:
    rows = read_jsonl(sorted(SRC.glob("drafts_*.jsonl")))
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        sys.exit("duplicate draft ids")
    return rows


def cmd_sample(a) -> None:
    import torch

    from loopchat import models
    from loopchat.generate import Generator, SamplingParams

    torch.set_num_threads(a.threads)
    rows = drafts()
    out_path = SRC / "samples.jsonl"
    have = {r["id"]: r for r in read_jsonl([out_path])} if out_path.exists() else {}
    for name, spec in (("default", "default"), ("sft", a.sft), ("policy", a.policy)):
        if spec is None:
            continue
        todo = [r for r in rows if name not in have.get(r["id"], {})]
        if not todo:
            continue
        model, tok = models.load(spec)
        gen = Generator(model, tok)
        params = SamplingParams(max_new_tokens=a.max_new_tokens, temperature=0.8, top_p=0.95, seed=a.seed)
        from tqdm import tqdm

        for k in tqdm(range(0, len(todo), a.batch), desc=f"sampling {name}"):
            chunk = todo[k : k + a.batch]
            res = gen.generate([r["prompt"] for r in chunk], params)
            for r, (c,) in zip(chunk, res):
                have.setdefault(r["id"], {"id": r["id"]})[name] = c.text.strip()
            # rewritten after every batch: an interrupted run resumes where it stopped
            tmp = out_path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(have[i]) + "\n" for i in sorted(have)))
            tmp.replace(out_path)
    print(f"wrote {out_path} ({len(have)} prompts)")


NEEDLESS = "needless_refusal"


def cmd_relabel_refusals(a) -> None:
    from loopchat.evaluate.rubric import is_refusal
    from loopchat.train.ppo import REFUSAL_OK  # where declining is (or can be) right: left as ranked

    rows = {r["id"]: r for r in drafts()}
    samples = {r["id"]: r for r in read_jsonl([SRC / "samples.jsonl"])}
    moved = added = 0
    for path in sorted(SRC.glob("labels_*.jsonl")):
        labels = read_jsonl([path])
        for lab in labels:
            r = rows[lab["id"]]
            if r["category"] in REFUSAL_OK:
                continue
            order = [[k for k in g if k not in (NEEDLESS, "policy")] for g in lab["order"]]
            last = [k for g in lab["order"] for k in g if k == NEEDLESS]
            moved += bool(last) and NEEDLESS not in lab["order"][-1]
            policy = samples.get(lab["id"], {}).get("policy")
            if policy is not None and is_refusal(policy):
                last.append("policy")
                added += 1
            lab["order"] = [g for g in order if g] + ([last] if last else [])
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(lab) + "\n" for lab in labels))
        tmp.replace(path)
    print(f"guideline v2: {moved} written needless refusals moved to last place, {added} policy refusals added last")


def cmd_assemble(a) -> None:
    rows = drafts()
    samples = {r["id"]: r for r in read_jsonl([SRC / "samples.jsonl"])}
    labels = {r["id"]: r for r in read_jsonl(sorted(SRC.glob("labels_*.jsonl")))}
    rng = random.Random(a.seed)
    by_cat = defaultdict(list)
    for r in rows:
        by_cat[r["category"]].append(r["id"])
    held = set()
    for cat, ids in sorted(by_cat.items()):
        ids = sorted(ids)
        rng.shuffle(ids)
        held.update(ids[: max(1, round(a.heldout * len(ids)))])
    out, missing = [], []
    for r in rows:
        lab = labels.get(r["id"])
        s = samples.get(r["id"], {})
        if lab is None or "default" not in s or "sft" not in s:
            missing.append(r["id"])
            continue
        texts = {w["kind"]: w["text"] for w in r["written"]}
        texts["default"], texts["sft"] = s["default"], s["sft"]
        kinds = [k for g in lab["order"] for k in g]
        if "policy" in kinds:  # a policy's reply joins only the rankings whose label places it
            texts["policy"] = s["policy"]
        if sorted(kinds) != sorted(texts):
            sys.exit(f"{r['id']}: label order {lab['order']} must list exactly {sorted(texts)}")
        rank = {k: g for g, group in enumerate(lab["order"]) for k in group}
        order = [w["kind"] for w in r["written"]] + ["default", "sft"] + (["policy"] if "policy" in texts else [])
        out.append({
            "id": r["id"], "category": r["category"], "split": "heldout" if r["id"] in held else "train",
            "prompt": r["prompt"], "responses": [texts[k] for k in order], "ranks": [rank[k] for k in order],
            "kinds": order,
        })
    if missing:
        print(f"skipped {len(missing)} prompts without labels or samples: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    path = DIR / "rankings.jsonl"
    path.write_text("".join(json.dumps(o, ensure_ascii=False) + "\n" for o in out))
    n_multi = sum(sum(m["role"] == "user" for m in o["prompt"]) > 1 for o in out)
    print(f"wrote {path}: {len(out)} rankings, {sum(o['split'] == 'heldout' for o in out)} held out, {n_multi} multi-turn")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("sample")
    p.add_argument("--sft", default=None, help="the SFT checkpoint (without it: only the embedded model's samples)")
    p.add_argument("--policy", default=None, help="a PPO checkpoint: its replies are kept as kind 'policy' and join a "
                   "ranking only where a label places them (used to label the replies a policy learned to hack with)")
    p.add_argument("--max-new-tokens", type=int, default=160)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_sample)
    p = sub.add_parser("relabel-refusals")
    p.set_defaults(func=cmd_relabel_refusals)
    p = sub.add_parser("assemble")
    p.add_argument("--heldout", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_assemble)
    a = ap.parse_args()
    a.func(a)


if __name__ == "__main__":
    main()
