"""`loopchat eval winrate`: the win rate counts ties as half, the KL of a model to itself is 0
and to another model is positive, held-out prompts are never trained on."""

from __future__ import annotations

import json

import pytest

from loopchat.evaluate import winrate as W
from loopchat.train import rollout


def _prompts(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"id": f"p{i}", "category": "c" + str(i % 2), "messages": [{"role": "user", "content": f"say something {i}"}]}) + "\n" for i in range(4)))
    return str(f)


def test_same_model_ties_and_zero_kl(tmp_path, tiny_dir):
    cfg = W.WinRateConfig(model=tiny_dir, baseline=tiny_dir, reward=tiny_dir, prompts=[_prompts(tmp_path)], out=str(tmp_path / "o"),
                          max_new_tokens=8, batch_size=4)
    res = W.run_winrate(cfg)
    assert res["win_rate"]["ALL"] == 0.5 and res["pairs"] == {"ALL": 4, "c0": 2, "c1": 2}
    assert res["kl_per_reply"] == pytest.approx(0.0, abs=1e-4)
    assert json.loads((tmp_path / "o" / "winrate.json").read_text())["prompts"] == 4


def test_kl_to_another_model_is_positive(tmp_path, tiny_dir, tokenizer):
    from conftest import make_tiny_checkpoint

    from loopchat import models

    other = make_tiny_checkpoint(tmp_path / "other", tokenizer, seed=1)
    m, tok = models.load(tiny_dir)
    b, _ = models.load(str(other))
    kls = W.kl_to(m, b, tok, [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "a longer question here"}]], 6, seed=0)
    assert len(kls) == 2 and all(k > 0 for k in kls)


def test_bundled_heldout_prompts_are_excluded_from_training(tokenizer):
    held = W.heldout_prompts([])
    assert len(held) >= 40 and {p["split"] for p in held} == {"heldout"}
    train, summary = rollout.collect_prompts(tokenizer, [], False, None, 1024)
    assert summary["skipped"]["held out for evaluation"] == len(held)
    assert not {p["id"] for p in held} & {p["id"] for p in train}
    assert len(train) >= 350


def test_reply_stats_show_a_refusal_hack(tokenizer):
    honest = W.reply_stats(tokenizer, ["The Adriatic Sea.", "Check whether joists rest on it.", "x = -11."])
    hacked = W.reply_stats(tokenizer, ["I can't help with that."] * 2 + ["x = -11."])
    assert honest["refusal_rate"] == 0.0 and hacked["refusal_rate"] == pytest.approx(2 / 3)
    assert hacked["distinct2"] < honest["distinct2"] and hacked["mean_tokens"] > 0
