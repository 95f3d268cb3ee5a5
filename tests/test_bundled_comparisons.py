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


def rows() -> list[dict]:
    return [json.loads(line) for line in PATH.read_text().splitlines() if line.strip()]


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
