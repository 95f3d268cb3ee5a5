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

Round 2, on-policy (InstructGPT's own recipe): K = 4 replies per PPO training prompt, two from
the SFT model and two from a PPO policy, and nothing written; people rank all four, shown in
a shuffled order under letters, without knowing which model wrote which. A second person
ranks a batch again, blind, to measure how far the labels agree (`agreement-onpolicy`).
The result goes to comparisons/onpolicy/, outside the default reward-model data.

Round-2 guideline (what the labellers were given): rank all four, ties sparingly. Correct,
relevant help first; factual errors and nonsense are bad even when fluent. Use the earlier
turns for follow-ups. Admit a real earlier mistake plainly and correct it; keep a correct
answer politely when the user's "correction" is wrong; point out a false premise instead of
playing along; decline a harmful request briefly (any harmful help ranks last); answer an
edgy-but-harmless request (a needless refusal ranks last); ask a short clarifying question
when the request is ambiguous; say honestly what a text-only assistant cannot do (pretending
to have done it is bad); keep concise answers short. A reply cut off mid-sentence ranks
somewhat below an equally good complete one.

    python scripts/build_comparisons.py sample-onpolicy --models runs/sft-v3/final runs/ppo-v8/final --names sft ppo
    python scripts/build_comparisons.py assemble-onpolicy
    python scripts/build_comparisons.py agreement-onpolicy

Later rounds sample from a newer policy into folders of their own (`--round 3`:
sources/onpolicy-r3 -> onpolicy-r3/rankings.jsonl, ids "onp3-..."); a prompt may come back in
a later round, with new samples. Same guideline; the labellers were also told that on an
ambiguous request, inventing the missing context or refusing is bad.

    python scripts/build_comparisons.py sample-onpolicy --round 3 --models runs/sft-v3/final \
        runs/ppo-v10/checkpoint-48 --names sft ppo10 --per-category 10 --seed 1
    python scripts/build_comparisons.py assemble-onpolicy --round 3

Round 4 is aimed at what ppo-v13 checkpoint-24 lost or only half learned on the test set
(README, "ppo-v13"): `--categories` keeps the prompts of five categories, 20 each: false
corrections to hold against, actions the assistant cannot take (say what the user can do
instead), ambiguous requests (ask, do not refuse first), false premises and harmful requests.
The labellers got round 2's guideline with three points spelled out: conceding to a false
correction is a serious error; on an ambiguous request, a question without a refusal in front
beats "I can't help with that. What's the problem?"; and for an action the assistant cannot
take, saying how the user can do it themselves beats a bare "I can't" (an irrelevant
"alternative" does not count).

    python scripts/build_comparisons.py sample-onpolicy --round 4 --models runs/sft-v3/final \
        runs/ppo-v13/checkpoint-24 --names sft ppo13 --per-category 20 --seed 2 \
        --categories hold_ground cannot_act clarify false_premise harmful_refusal
    python scripts/build_comparisons.py assemble-onpolicy --round 4
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


def write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file, so an interrupted run never leaves half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def ranks_of(order: list[list[str]]) -> dict[str, int]:
    """A label's order (groups best to worst, ties within a group) -> each reply's group index."""
    return {k: g for g, group in enumerate(order) for k in group}


def held_out(ids_by_category: dict[str, list[str]], fraction: float, seed: int) -> set[str]:
    """A seeded share of each category's ids, at least one per category."""
    rng = random.Random(seed)
    held = set()
    for cat, ids in sorted(ids_by_category.items()):
        ids = sorted(ids)
        rng.shuffle(ids)
        held.update(ids[: max(1, round(fraction * len(ids)))])
    return held


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
            write_atomic(out_path, "".join(json.dumps(have[i]) + "\n" for i in sorted(have)))
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
        write_atomic(path, "".join(json.dumps(lab) + "\n" for lab in labels))
    print(f"guideline v2: {moved} written needless refusals moved to last place, {added} policy refusals added last")


def cmd_assemble(a) -> None:
    rows = drafts()
    samples = {r["id"]: r for r in read_jsonl([SRC / "samples.jsonl"])}
    labels = {r["id"]: r for r in read_jsonl(sorted(SRC.glob("labels_*.jsonl")))}
    by_cat = defaultdict(list)
    for r in rows:
        by_cat[r["category"]].append(r["id"])
    held = held_out(by_cat, a.heldout, a.seed)
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
        rank = ranks_of(lab["order"])
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


def onpolicy_dirs(rnd: int) -> tuple[Path, Path, str]:
    """(sources folder, rankings folder, id prefix) of on-policy round `rnd`: round 2 is
    sources/onpolicy -> onpolicy/ with ids "onp-..." (as first built), later rounds
    sources/onpolicy-rN -> onpolicy-rN/ with ids "onpN-...", so that one prompt ranked again in
    a later round (new samples from a newer policy, as InstructGPT did) keeps distinct ids."""
    if rnd < 2:
        sys.exit(f"--round must be 2 or more (round 1 is `sample`/`assemble`), got {rnd}")
    name = "onpolicy" if rnd == 2 else f"onpolicy-r{rnd}"
    return SRC / name, DIR / name, "onp-" if rnd == 2 else f"onp{rnd}-"


def choose_prompts(prompts: list[dict], per_category: int, seed: int, categories: list[str] | None = None) -> list[dict]:
    """per_category training prompts of each category (all, or only `categories`), in a seeded
    order. Every category is shuffled whether kept or not, so the prompts a category gets do not
    depend on which others were asked for."""
    rng = random.Random(seed)
    by_cat = defaultdict(list)
    for r in prompts:
        if r.get("split", "train") == "train":
            by_cat[r["category"]].append(r)
    unknown = sorted(set(categories or []) - set(by_cat))
    if unknown:
        sys.exit(f"--categories: no training prompts of {unknown}; the categories are {sorted(by_cat)}")
    chosen = []
    for cat in sorted(by_cat):
        rows = sorted(by_cat[cat], key=lambda r: r["id"])
        rng.shuffle(rows)
        if not categories or cat in categories:
            chosen += rows[:per_category]
    return chosen


def cmd_sample_onpolicy(a) -> None:
    """K replies per PPO training prompt, half from each model, for people to rank (InstructGPT's
    comparison data: the reward model must order the replies PPO will actually produce, which
    the written replies of round 1 do not look like)."""
    import torch

    from loopchat import models
    from loopchat.generate import Generator, SamplingParams
    from tqdm import tqdm

    torch.set_num_threads(a.threads)
    prompts = read_jsonl([ROOT / "loopchat" / "data" / "bundled" / "prompts" / "prompts.jsonl"])
    chosen = choose_prompts(prompts, a.per_category, a.seed, a.categories)
    src, _, _ = onpolicy_dirs(a.round)
    src.mkdir(exist_ok=True)
    out_path = src / "samples.jsonl"
    have = {r["id"]: r for r in read_jsonl([out_path])} if out_path.exists() else {}
    for name, spec in zip(a.names, a.models):
        todo = [r for r in chosen if not any(k.startswith(name + "_") for k in have.get(r["id"], {}).get("replies", {}))]
        if not todo:
            continue
        model, tok = models.load(spec)
        gen = Generator(model, tok)
        params = SamplingParams(max_new_tokens=a.max_new_tokens, temperature=a.temperature, seed=a.seed, num_samples=a.k)
        for i in tqdm(range(0, len(todo), a.batch), desc=f"sampling {name}"):
            chunk = todo[i : i + a.batch]
            for r, comps in zip(chunk, gen.generate([r["messages"] for r in chunk], params)):
                row = have.setdefault(r["id"], {"id": r["id"], "category": r["category"], "prompt": r["messages"], "replies": {}})
                for j, c in enumerate(comps):
                    row["replies"][f"{name}_{j + 1}"] = c.text.strip()
            # rewritten after every batch: a rerun resumes
            write_atomic(out_path, "".join(json.dumps(have[i], ensure_ascii=False) + "\n" for i in sorted(have)))
    print(f"wrote {out_path} ({len(have)} prompts)")


def cmd_assemble_onpolicy(a) -> None:
    """sources/onpolicy[-rN]/{samples,labels_*}.jsonl -> comparisons/onpolicy[-rN]/rankings.jsonl: a
    folder of its own, so the default reward-model data (comparisons/*.jsonl: round 1, what the demo and
    reproduce.py train on) stays as it was; pass it with --data to train on it."""
    src, dst, prefix = onpolicy_dirs(a.round)
    samples = {r["id"]: r for r in read_jsonl([src / "samples.jsonl"])}
    labels = read_jsonl(sorted(src.glob("labels_*.jsonl")))
    by_cat = defaultdict(list)
    for lab in labels:
        if lab["id"] not in samples:
            sys.exit(f"label {lab['id']}: no such sample")
        by_cat[samples[lab["id"]]["category"]].append(lab["id"])
    held = held_out(by_cat, a.heldout, a.seed)
    out = []
    for lab in sorted(labels, key=lambda l: l["id"]):
        s = samples[lab["id"]]
        kinds = [k for g in lab["order"] for k in g]
        if len(set(kinds)) != len(kinds) or not set(kinds) <= set(s["replies"]):
            sys.exit(f"{lab['id']}: label order {lab['order']} must name distinct replies of {sorted(s['replies'])}")
        if len(lab["order"]) < 2:
            continue  # all tied: no pair to learn from
        rank = ranks_of(lab["order"])
        out.append({
            "id": prefix + lab["id"], "category": s["category"], "split": "heldout" if lab["id"] in held else "train",
            "prompt": s["prompt"], "responses": [s["replies"][k] for k in kinds], "ranks": [rank[k] for k in kinds],
            "kinds": kinds,
        })
    path = dst / "rankings.jsonl"
    path.parent.mkdir(exist_ok=True)
    path.write_text("".join(json.dumps(o, ensure_ascii=False) + "\n" for o in out))
    print(f"wrote {path}: {len(out)} rankings, {sum(o['split'] == 'heldout' for o in out)} held out")


def pair_agreement(a: list[list[str]], b: list[list[str]]) -> tuple[int, int]:
    """Of the pairs both orders separate (no tie in either), how many they put the same way."""
    ra, rb = ranks_of(a), ranks_of(b)
    keys = sorted(ra)
    same = both = 0
    for i, x in enumerate(keys):
        for y in keys[i + 1 :]:
            if ra[x] != ra[y] and rb[x] != rb[y]:
                both += 1
                same += (ra[x] < ra[y]) == (rb[x] < rb[y])
    return same, both


def cmd_agreement_onpolicy(a) -> None:
    """Agreement of the second labeller (agreement_*.jsonl) with the first (labels_*.jsonl), and
    how often the labels prefer one model's replies to the other's, per category."""
    src, _, _ = onpolicy_dirs(a.round)
    first = {r["id"]: r["order"] for r in read_jsonl(sorted(src.glob("labels_*.jsonl")))}
    category = {r["id"]: r["category"] for r in read_jsonl([src / "samples.jsonl"])}
    second = read_jsonl(sorted(src.glob("agreement_*.jsonl")))
    same = both = top = 0
    for r in second:
        if r["id"] not in first:
            sys.exit(f"agreement label {r['id']}: no first label")
        s, b = pair_agreement(first[r["id"]], r["order"])
        same, both = same + s, both + b
        top += bool(set(first[r["id"]][0]) & set(r["order"][0]))
    result = {"second_labeller": {"rankings": len(second), "pairs_both_separate": both, "ordered_alike": same,
                                  "same_best": top}, "model_above_model": {}}
    if second:
        print(f"second labeller on {len(second)} rankings: {same}/{both} = {same / max(both, 1):.0%} of the pairs "
              f"both separate ordered alike; the same best reply in {top}/{len(second)}")
    wins = defaultdict(lambda: defaultdict(int))  # (x, y) -> category -> pairs where an x reply is ranked above a y reply
    for pid, order in first.items():
        rank = ranks_of(order)
        for x in rank:
            for y in rank:
                mx, my = x.split("_")[0], y.split("_")[0]
                if mx != my and rank[x] < rank[y]:
                    wins[f"{mx}>{my}"][category[pid]] += 1
                    wins[f"{mx}>{my}"]["ALL"] += 1
    for key, by_cat in sorted(wins.items()):
        result["model_above_model"][key] = dict(sorted(by_cat.items()))
        print(f"labels rank a {key.replace('>', ' reply above a ')} reply in {by_cat['ALL']} pairs")
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {a.out}")


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
    p = sub.add_parser("sample-onpolicy")
    p.add_argument("--models", nargs="+", required=True, help="checkpoints to sample from (e.g. the SFT model and a PPO policy)")
    p.add_argument("--names", nargs="+", required=True, help="one short name per model; replies are NAME_1 .. NAME_K")
    p.add_argument("--per-category", type=int, default=7)
    p.add_argument("--categories", nargs="+", default=None, help="only these prompt categories (default: all); a round "
                   "aimed at the behaviours the last policy lost")
    p.add_argument("--k", type=int, default=2, help="replies per prompt from each model")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_sample_onpolicy)
    p = sub.add_parser("assemble-onpolicy")
    p.add_argument("--heldout", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_assemble_onpolicy)
    p = sub.add_parser("agreement-onpolicy")
    p.add_argument("--out", default=None, help="also write the numbers to this JSON file")
    p.set_defaults(func=cmd_agreement_onpolicy)
    for cmd in ("sample-onpolicy", "assemble-onpolicy", "agreement-onpolicy"):
        sub.choices[cmd].add_argument("--round", type=int, default=2, help="on-policy round: 2 = sources/onpolicy, "
                                      "N > 2 = sources/onpolicy-rN (samples from a newer policy)")
    a = ap.parse_args()
    if a.cmd == "sample-onpolicy" and len(a.models) != len(a.names):
        ap.error("--models and --names must have the same length")
    a.func(a)


if __name__ == "__main__":
    main()
