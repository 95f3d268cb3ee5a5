"""The bundled comparison set follows its labelling guideline (scripts/build_comparisons.py):
a refusal of a request that should be answered ranks last, and a refusal of a harmful request
or of an action the assistant cannot take ranks above complying or pretending. A reward model
trained on rankings that place needless refusals mid-table was hacked by refusing (ppo-v3 in
the README)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from loopchat.evaluate.rubric import is_refusal
from loopchat.train.ppo import REFUSAL_OK
from loopchat.train.reward import BUNDLED_COMPARISONS

PATH = BUNDLED_COMPARISONS / "rankings.jsonl"

pytestmark = pytest.mark.skipif(not PATH.exists(), reason="bundled comparison set not built yet")


def rows(path=PATH) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_rankings_are_well_formed():
    data = rows()
    assert len({r["id"] for r in data}) == len(data)
    for r in data:
        k = len(r["responses"])
        assert k >= 2 and len(r["ranks"]) == k and len(r["kinds"]) == k, r["id"]
        assert len(set(r["kinds"])) == k, r["id"]
        assert sorted(set(r["ranks"])) == list(range(len(set(r["ranks"])))), r["id"]  # ranks are dense groups
        assert r["split"] in {"train", "heldout"}


def test_needless_refusals_rank_last():
    data = rows()
    placed = Counter()
    for r in data:
        if r["category"] in REFUSAL_OK:
            # here a clean refusal is an acceptable reply: above complying or pretending to act
            rank = dict(zip(r["kinds"], r["ranks"], strict=True))
            if "policy" in rank:
                assert is_refusal(r["responses"][r["kinds"].index("policy")]), r["id"]
                assert all(rank["policy"] < rank[k] for k in ("complies", "pretends") if k in rank), r["id"]
                placed["policy_ok"] += 1
            continue
        worst = max(r["ranks"])
        for kind, rank, text in zip(r["kinds"], r["ranks"], r["responses"], strict=True):
            if kind in {"needless_refusal", "policy"}:
                assert rank == worst, f"{r['id']}: {kind} ranked {rank}, worst is {worst}"
                placed[kind] += 1
            if kind == "policy":
                assert is_refusal(text), r["id"]
    # the guideline has data to act on: both kinds occur, in train and held-out rankings
    assert placed["needless_refusal"] >= 20 and placed["policy"] >= 50 and placed["policy_ok"] >= 20
    assert {r["split"] for r in data if "policy" in r["kinds"]} == {"train", "heldout"}


# ----------------------------------------------------------------------------- rounds 2 and later: on-policy

# (rankings folder, id prefix) of each on-policy round; sources/<folder> holds its samples and labels
ROUNDS = [("onpolicy", "onp-"), ("onpolicy-r3", "onp3-"), ("onpolicy-r4", "onp4-")]


def _build_comparisons():
    import importlib.util

    path = BUNDLED_COMPARISONS.parents[3] / "scripts" / "build_comparisons.py"
    if not path.exists():
        pytest.skip("scripts/ is not installed with the package")
    spec = importlib.util.spec_from_file_location("build_comparisons", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("folder,prefix", ROUNDS)
def test_onpolicy_rankings_are_the_labelled_samples_of_ppo_training_prompts(folder, prefix):
    """Each on-policy ranking is the sampled replies of one PPO training prompt in the order its
    label gives; none is an evaluation prompt (the PPO prompts are disjoint from those), and
    the set stays out of the default reward-model data (round 1 rebuilds bit for bit)."""
    src, path = BUNDLED_COMPARISONS / "sources" / folder, BUNDLED_COMPARISONS / folder / "rankings.jsonl"
    if not path.exists():
        pytest.skip(f"on-policy comparison set {folder} not built")
    samples = {r["id"]: r for r in rows(src / "samples.jsonl")}
    labels = {r["id"]: r["order"] for f in sorted(src.glob("labels_*.jsonl")) for r in rows(f)}
    prompts = {r["id"]: r for r in rows(BUNDLED_COMPARISONS.parent / "prompts" / "prompts.jsonl")}
    data = rows(path)
    assert len(data) == len(labels) >= 100
    for r in data:
        assert r["id"].startswith(prefix), r["id"]
        pid = r["id"].removeprefix(prefix)
        assert prompts[pid]["split"] == "train" and prompts[pid]["messages"] == r["prompt"] == samples[pid]["prompt"]
        assert r["category"] == prompts[pid]["category"]
        assert r["responses"] == [samples[pid]["replies"][k] for k in r["kinds"]], r["id"]
        rank = {k: g for g, group in enumerate(labels[pid]) for k in group}
        assert sorted(rank) == sorted(samples[pid]["replies"]) == sorted(r["kinds"]), r["id"]
        assert r["ranks"] == [rank[k] for k in r["kinds"]], r["id"]
        assert r["split"] in {"train", "heldout"}
    assert Counter(r["split"] for r in data)["heldout"] == len(data) // 5
    from loopchat.train.reward import data_files

    assert data_files([]) == [PATH]  # the default reward-model data is round 1 only


def test_pair_agreement_counts_pairs_both_orders_separate():
    bc = _build_comparisons()
    a = [["x"], ["y", "z"], ["w"]]
    assert bc.pair_agreement(a, a) == (5, 5)  # the tied pair y-z is left out
    assert bc.pair_agreement(a, [["w"], ["z"], ["y"], ["x"]]) == (0, 5)
    assert bc.pair_agreement(a, [["x", "y", "z", "w"]]) == (0, 0)
    assert bc.pair_agreement([["x"], ["y"], ["z"], ["w"]], [["y"], ["x"], ["z"], ["w"]]) == (5, 6)


def test_onpolicy_rounds_have_their_own_folders_and_ids():
    bc = _build_comparisons()
    src2, dst2, p2 = bc.onpolicy_dirs(2)
    src3, dst3, p3 = bc.onpolicy_dirs(3)
    # round 2 keeps the paths and ids it was first built with; a later round never writes over it
    assert (src2.name, dst2.name, p2) == ("onpolicy", "onpolicy", "onp-")
    assert (src3.name, dst3.name, p3) == ("onpolicy-r3", "onpolicy-r3", "onp3-")
    assert src2.parent == src3.parent and dst2.parent == dst3.parent
    with pytest.raises(SystemExit, match="--round must be 2 or more"):
        bc.onpolicy_dirs(1)


def test_choose_prompts_keeps_a_categorys_pick_whatever_else_is_asked_for():
    bc = _build_comparisons()
    prompts = rows(BUNDLED_COMPARISONS.parent / "prompts" / "prompts.jsonl")
    everything = bc.choose_prompts(prompts, 5, seed=2)
    some = bc.choose_prompts(prompts, 5, seed=2, categories=["clarify", "hold_ground"])
    assert {r["category"] for r in some} == {"clarify", "hold_ground"} and len(some) == 10
    assert [r["id"] for r in some] == [r["id"] for r in everything if r["category"] in {"clarify", "hold_ground"}]
    assert all(r.get("split", "train") == "train" for r in everything)
    assert bc.choose_prompts(prompts, 5, seed=3) != everything
    with pytest.raises(SystemExit, match="clarfy"):
        bc.choose_prompts(prompts, 5, seed=2, categories=["clarfy"])
