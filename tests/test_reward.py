"""Reward model: the ranking loss, K-way pairs with ties, the reward at the last real token,
the normalisation offset, data sources, and a tiny training run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from loopchat.data.records import ConversationRecord, Node
from loopchat.train import reward as R


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------- pure pieces


def test_pairwise_loss_hand_computed():
    rb = torch.tensor([2.0, 0.0, -1.0])
    rw = torch.tensor([1.0, 0.0, 1.0])
    # -log sigmoid(1) - log sigmoid(0) - log sigmoid(-2)
    want = math.log(1 + math.exp(-1)) + math.log(2) + math.log(1 + math.exp(2))
    assert R.pairwise_loss(rb, rw).item() == pytest.approx(want, rel=1e-6)


def test_ranking_pairs_all_k_choose_2():
    pairs = R.ranking_pairs([2, 0, 3, 1])  # reply 1 best, then 3, then 0, then 2
    assert len(pairs) == 6
    assert set(pairs) == {(1, 3), (1, 0), (1, 2), (3, 0), (3, 2), (0, 2)}


def test_ranking_pairs_ties_give_no_pair():
    pairs = R.ranking_pairs([0, 1, 1, 2])
    assert (1, 2) not in pairs and (2, 1) not in pairs
    assert set(pairs) == {(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)}
    assert R.ranking_pairs([1, 1, 1]) == []


def test_last_token_index_left_and_right_padding():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert R.last_token_index(right).tolist() == [2, 4, 0]
    assert R.last_token_index(left).tolist() == [4, 4, 4]


def test_reward_same_under_left_and_right_padding(tiny_dir, tokenizer):
    model, tok = R.load_reward_model(tiny_dir)
    torch.nn.init.normal_(model.score.weight, std=1.0)  # a fresh head is zero: make it say something
    seqs = [[5, 6, 7, 8, 2], [9, 10, 2]]
    pad = tok.pad_token_id
    right = torch.tensor([[5, 6, 7, 8, 2], [9, 10, 2, pad, pad]])
    rmask = (torch.arange(5)[None] < torch.tensor([[5], [3]])).long()
    left = torch.tensor([[5, 6, 7, 8, 2], [pad, pad, 9, 10, 2]])
    lmask = (torch.arange(5)[None] >= torch.tensor([[0], [2]])).long()
    with torch.no_grad():
        r_right = R.gather_last(R.token_scores(model, right, rmask), rmask)
        r_left = R.gather_last(R.token_scores(model, left, lmask), lmask)
        alone = [R.token_scores(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0, -1] for s in seqs]
    assert torch.allclose(r_right, r_left, atol=1e-5)
    assert torch.allclose(r_right, torch.stack(alone), atol=1e-5)
    # the reward is NOT read at a padding position: a padded row differs from its pad's score
    assert not torch.isclose(r_right[1], R.token_scores(model, right, rmask)[1, -1]).item()


def test_collate_runs_each_reply_once_and_indexes_pairs():
    items = [
        R.RankItem([1, 2], [[3, 2], [4, 4, 2], [5, 2], [6, 2]], R.ranking_pairs([0, 1, 2, 3])),  # K=4: 6 pairs
        R.RankItem([7], [[8, 2], [9, 2]], R.ranking_pairs([1, 0])),
    ]
    b = R.make_collate(0)(items)
    assert b["input_ids"].shape[0] == 6  # 4 + 2 forward rows, not 2 x (6 + 1) pair rows
    assert b["num_units"] == 7
    assert b["better"].tolist()[:6] == [0, 0, 0, 1, 1, 2] and b["worse"].tolist()[:6] == [1, 2, 3, 2, 3, 3]
    assert (b["better"][6].item(), b["worse"][6].item()) == (5, 4)
    assert b["input_ids"][1].tolist() == [1, 2, 4, 4, 2] and b["attention_mask"][0].tolist() == [1, 1, 1, 1, 0]


def test_rm_loss_matches_manual(tiny_dir):
    model, tok = R.load_reward_model(tiny_dir)
    torch.nn.init.normal_(model.score.weight, std=1.0)
    items = [R.RankItem([1, 2], [[3, 2], [4, 4, 2], [5, 2]], R.ranking_pairs([0, 1, 1]))]
    b = R.make_collate(tok.pad_token_id)(items)
    loss, n, m = R.rm_loss(R.ScoreModel(model), b)
    with torch.no_grad():
        r = [R.token_scores(model, torch.tensor([x]), torch.ones(1, len(x), dtype=torch.long))[0, -1] for x in ([1, 2, 3, 2], [1, 2, 4, 4, 2], [1, 2, 5, 2])]
    want = -torch.nn.functional.logsigmoid(r[0] - r[1]) - torch.nn.functional.logsigmoid(r[0] - r[2])
    assert n == 2 and loss.item() == pytest.approx(want.item(), abs=1e-5)
    assert m["accuracy"] in (0.0, 0.5, 1.0)


def test_fresh_head_starts_at_zero(tiny_dir):
    model, tok = R.load_reward_model(tiny_dir)
    s = R.score_replies(model, tok, [[{"role": "user", "content": "hi"}]], ["hello"])
    assert s == [0.0] and R.reward_offset(model) == 0.0


# ----------------------------------------------------------------------------- data


def test_rows_to_items_counts_skips(tokenizer):
    s = R.RMDataSummary()
    rows = [
        {"prompt": [{"role": "user", "content": "q"}], "responses": ["a", "b", "c"], "ranks": [0, 1, 1], "category": "x"},
        {"prompt": [{"role": "user", "content": "q"}], "responses": ["a", "b"], "ranks": [0, 0]},
        {"prompt": [{"role": "user", "content": "q " * 400}], "responses": ["a", "b"], "ranks": [0, 1]},
    ]
    items = R.rows_to_items(tokenizer, rows, 128, s, "test")
    assert len(items) == 1 and items[0].pairs == [(0, 1), (0, 2)] and items[0].category == "x"
    assert items[0].responses[0][-1] == tokenizer.eos_token_id
    assert s.skipped == {"all replies tied": 1, "longer than max_seq_len": 1}


def test_thumbs_on_siblings_become_a_ranking():
    from types import SimpleNamespace as NS

    rec = ConversationRecord([
        Node("1", None, "user", "q"), Node("2", "1", "assistant", "good"), Node("3", "1", "assistant", "bad"),
        Node("4", "1", "assistant", "unrated"),
    ])
    fb = [NS(message_id=2, thumbs=1), NS(message_id=3, thumbs=-1), NS(message_id=3, thumbs=-1)]
    out = R.thumbs_rankings([rec], fb)
    assert [r.groups for r in out[0].rankings] == [[["2"], ["3"]]]
    rows = list(R.ranking_rows(out[0]))
    assert rows[0]["responses"] == ["good", "bad"] and rows[0]["ranks"] == [0, 1]


def test_store_rankings_feed_the_trainer(tmp_path, tokenizer):
    from loopchat.data.store import Store

    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    c = store.new_conversation()
    u = store.add_message(c, None, "user", "name a colour")
    a, b, d = (store.add_message(c, u, "assistant", t) for t in ("blue", "idk", "green"))
    store.add_ranking([[a], [b]])
    store.add_feedback(d, thumbs=1)
    store.add_feedback(b, thumbs=-1)
    cfg = R.RMConfig(data=[str(write_jsonl(tmp_path / "r.jsonl", [
        {"prompt": [{"role": "user", "content": "q"}], "responses": ["x", "y"], "ranks": [0, 1]}]))],
        store=True, db=store.url)
    items, s = R.load_rankings(tokenizer, cfg)
    assert s.by_source == {"r.jsonl": 1, "store": 2}
    assert sorted(len(it.pairs) for it in items) == [1, 1, 1]


def test_preference_files_are_k2_rankings(tmp_path, tokenizer):
    f = Path(__file__).parent / "fixtures" / "hh_rlhf.jsonl"
    items, s = R.load_rankings(tokenizer, R.RMConfig(data=[str(f)]))
    assert items and all(len(it.responses) == 2 and it.pairs == [(0, 1)] for it in items)


def test_bad_rm_data_errors(tmp_path, tokenizer):
    from loopchat.data.formats import FormatError

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": [{"role": "user", "content": "q"}], "responses": ["a"], "ranks": [0, 1]}\n')
    with pytest.raises((FormatError, ValueError), match="bad.jsonl"):
        R.load_rankings(tokenizer, R.RMConfig(data=[str(bad)]))
    tied = write_jsonl(tmp_path / "tied.jsonl", [{"prompt": [{"role": "user", "content": "q"}], "responses": ["a", "b"], "ranks": [0, 0]}])
    with pytest.raises(ValueError, match="no usable rankings.*all replies tied"):
        R.prepare_data(tokenizer, R.RMConfig(data=[str(tied)]), log=lambda *a: None)


def test_bundled_comparisons_are_valid_and_disjoint_from_eval(tokenizer):
    files = sorted(R.BUNDLED_COMPARISONS.glob("*.jsonl"))
    if not files:
        pytest.skip("bundled comparison set not built yet")
    from loopchat.data.formats import read_file

    rows = [row for f in files for rec in read_file(f) for row in R.ranking_rows(rec)]
    assert len(rows) >= 300
    assert all(4 <= len(r["responses"]) <= 6 for r in rows)
    assert sum(len([m for m in r["prompt"] if m["role"] == "user"]) > 1 for r in rows) >= len(rows) / 3
    assert {r.get("split") for r in rows} == {"train", "heldout"}
    ev = Path(R.__file__).resolve().parent.parent / "data" / "bundled" / "eval" / "behaviours.jsonl"
    eval_prompts = {json.loads(l)["messages"][-1]["content"].strip().lower() for l in ev.read_text().splitlines() if l.strip()}
    assert not eval_prompts & {r["prompt"][-1]["content"].strip().lower() for r in rows}


# ----------------------------------------------------------------------------- training


def _toy_rankings(n: int) -> list[dict]:
    """Learnable: the reply that says 'yes' beats the one that says 'no' beats 'maybe'."""
    rows = []
    for i in range(n):
        q = [{"role": "user", "content": f"question number {i}?"}]
        rows.append({"prompt": q, "responses": ["maybe", "yes", "no"], "ranks": [2, 0, 1], "split": "heldout" if i % 5 == 0 else "train"})
    return rows


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory, tiny_dir):
    """A reward model trained through the CLI on a learnable toy ranking set."""
    import subprocess
    import sys

    d = tmp_path_factory.mktemp("rm")
    data = write_jsonl(d / "toy.jsonl", _toy_rankings(20))
    demos = write_jsonl(d / "demos.jsonl", [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "yes"}]} for i in range(6)])
    cmd = [sys.executable, "-m", "loopchat.cli", "train", "rm", "--model", tiny_dir, "--data", str(data), "--offset-data", str(demos),
           "--out", str(d / "run"), "--lr", "3e-3", "--epochs", "6", "--batch-size", "4", "--grad-accum", "2",
           "--eval-every", "0", "--save-every", "0", "--no-bf16"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    return d, d / "run"


def test_rm_run_learns_and_normalises(toy_run):
    _, run = toy_run
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in recs if "eval_accuracy" in r]
    assert evals[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-4)  # zero head: every pair at 0.5
    assert evals[-1]["eval_accuracy"] == 1.0 and evals[-1]["eval_loss"] < 0.3
    assert (run / "curves.png").exists() and json.loads((run / "data_summary.json").read_text())["eval_rankings"] == 4
    model, tok = R.load_reward_model(str(run))  # a run folder means its final/
    off = R.reward_offset(model)
    assert off == pytest.approx(recs[-1]["reward_offset"]) and off != 0.0
    demo_scores = R.score_replies(model, tok, [[{"role": "user", "content": f"q{i}"}] for i in range(6)], ["yes"] * 6, autocast=False)
    assert abs(sum(demo_scores) / 6) < 1e-3  # demonstrations score mean 0 after normalisation
    s_yes, s_maybe = R.score_replies(model, tok, [[{"role": "user", "content": "question number 3?"}]] * 2, ["yes", "maybe"], autocast=False)
    assert s_yes > s_maybe
    from transformers import AutoModelForSequenceClassification

    plain = AutoModelForSequenceClassification.from_pretrained(run / "final")
    assert getattr(plain.config, R.OFFSET_KEY) == pytest.approx(off)


def test_rm_score_and_eval_cli(toy_run):
    import subprocess
    import sys

    d, run = toy_run
    p = subprocess.run([sys.executable, "-m", "loopchat.cli", "rm", "score", "--reward", str(run), "--data", str(d / "toy.jsonl")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [json.loads(l) for l in p.stdout.splitlines()]
    assert len(rows) == 60 and all(r["reward"] == pytest.approx(r["raw"] - rows[0]["raw"] + rows[0]["reward"]) for r in rows)
    best = [r["reward"] for r in rows if r["rank"] == 0]
    worst = [r["reward"] for r in rows if r["rank"] == 2]
    assert min(best) > max(worst)
    p = subprocess.run([sys.executable, "-m", "loopchat.cli", "eval", "rm", "--reward", str(run), "--data", str(d / "toy.jsonl"), "--out", str(d / "ev")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads((d / "ev" / "rm_eval.json").read_text())
    assert res["accuracy"]["ALL"]["pairs"] == 60 and res["accuracy"]["ALL"]["accuracy"] > 0.9
    assert (d / "ev" / "calibration.png").stat().st_size > 1000 and "accuracy" in p.stdout
    p = subprocess.run([sys.executable, "-m", "loopchat.cli", "rm", "score", "--reward", str(d / "nope"), "--data", str(d / "toy.jsonl")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "nope" in p.stderr and "Traceback" not in p.stderr


def test_rm_score_reads_trl_prompt_completion(toy_run):
    import io

    from loopchat.evaluate.rm import score_file

    d, run = toy_run
    f = d / "pc.jsonl"
    f.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": "question number 3?"}], "completion": c}) + "\n" for c in ("yes", "maybe")))
    rows = score_file(str(run), str(f), out=io.StringIO())
    model, tok = R.load_reward_model(str(run))
    want = R.score_replies(model, tok, [[{"role": "user", "content": "question number 3?"}]] * 2, ["yes", "maybe"])
    assert [r["reward"] for r in rows] == pytest.approx(want, abs=1e-6)  # the same scoring path as score_replies
    assert rows[0]["reward"] > rows[1]["reward"]


def test_eval_rm_calibration_table():
    from loopchat.evaluate.rm import calibration

    preds = [{"p_better": 0.9, "category": "a"}, {"p_better": 0.8, "category": "a"}, {"p_better": 0.3, "category": "b"}]
    t = calibration(preds, bins=10)
    assert sum(r["n"] for r in t) == 6
    top = [r for r in t if r["lo"] >= 0.8]
    assert all(r["observed"] == 1.0 for r in top)  # (0.9, 1) and (0.8, 1) land in the top bins
    low = [r for r in t if r["hi"] <= 0.2]
    assert all(r["observed"] == 0.0 for r in low)
