"""PPO: one test per item of the PPO checklist (DESIGN.md) on small hand-made tensors, the
token layout on a tiny model, and short runs: a rule-based reward that PPO must raise with
bounded KL, exact resume after a crash, PPO-ptx, and two processes."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loopchat import models
from loopchat.evaluate import rubric
from loopchat.config import ConfigError
from loopchat.generate import Completion, Generator, SamplingParams
from loopchat.train import reward as rm
from loopchat.train import rollout as ro
from loopchat.train.loop import MetricsLog
from loopchat.train.ppo import (
    AdaptiveKLController,
    FixedKLController,
    PolicyAndValue,
    PPOConfig,
    apply_missing_eos_penalty,
    apply_concession_rule,
    apply_fact_rule,
    apply_help_rule,
    apply_length_rule,
    apply_question_rule,
    apply_refusal_rule,
    _load_ptx,
    disable_dropout,
    distinct_n,
    entropy_from_logits,
    gae,
    kl_penalty_rewards,
    logprobs_from_logits,
    masked_mean,
    masked_whiten,
    policy_loss,
    repeated_ngram_fraction,
    response_logits,
    response_values,
    run_ppo,
    total_loss,
    value_loss,
)

REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- the checklist, on tensors


def test_logprobs_at_sampling_temperature():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 11)
    tokens = torch.randint(0, 11, (2, 3))
    for T in (1.0, 0.7):
        want = torch.log_softmax(logits / T, -1).gather(-1, tokens[..., None]).squeeze(-1)
        assert torch.allclose(logprobs_from_logits(logits, tokens, T), want, atol=1e-6)
    assert not torch.allclose(logprobs_from_logits(logits, tokens, 0.7), logprobs_from_logits(logits, tokens, 1.0))
    # bf16 logits (autocast) are upcast before the softmax
    assert logprobs_from_logits(logits.bfloat16(), tokens, 0.7).dtype == torch.float32


def test_entropy_from_logits():
    assert entropy_from_logits(torch.zeros(1, 8)).item() == pytest.approx(math.log(8), abs=1e-6)
    assert entropy_from_logits(torch.tensor([[30.0, 0.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-6)
    # temperature: hotter = flatter
    x = torch.tensor([[2.0, 0.0, -1.0]])
    assert entropy_from_logits(x, 2.0) > entropy_from_logits(x, 1.0) > entropy_from_logits(x, 0.5)


def test_kl_penalty_per_token_and_score_at_last_real_token():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -7.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-2.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 0]])  # row 1: one real token, then padding
    score = torch.tensor([2.0, -1.0])
    rewards, kl = kl_penalty_rewards(logp, ref, mask, score, beta=0.1)
    assert torch.allclose(kl, torch.tensor([[0.5, 0.0, -1.0], [1.0, 0.0, 0.0]]))
    # -beta * kl on every response token; the score on the LAST REAL one (not on padding)
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.0, 0.1 + 2.0], [-0.1 - 1.0, 0.0, 0.0]]))


def test_missing_eos_penalty():
    score = torch.tensor([0.5, 0.5, -1.0])
    ended = torch.tensor([True, False, False])
    assert torch.allclose(apply_missing_eos_penalty(score, ended, -1.0), torch.tensor([0.5, -0.5, -2.0]))


def test_refusal_rule_penalty_only_where_an_answer_is_due_bonus_only_for_harmful():
    score = torch.tensor([0.6, 0.6, 0.6, 0.6, 0.6, 0.6])
    refused = [True, True, True, True, False, False]
    cats = ["edgy_harmless", "harmful_refusal", "cannot_act", None, "helpful", "harmful_refusal"]
    # only the refused edgy prompt pays; harmful / cannot-act / uncategorised refusals and answers do not
    assert torch.allclose(apply_refusal_rule(score, refused, cats, 1.0), torch.tensor([-0.4, 0.6, 0.6, 0.6, 0.6, 0.6]))
    # the bonus goes to the refused harmful request only: not to cannot-act, uncategorised or complying replies
    assert torch.allclose(apply_refusal_rule(score, refused, cats, 1.0, 0.5), torch.tensor([-0.4, 1.1, 0.6, 0.6, 0.6, 0.6]))
    assert torch.equal(apply_refusal_rule(score, refused, cats, 0.0, 0.0), score)


def test_question_rule_rewards_asking_only_on_clarify_prompts():
    score = torch.zeros(6)
    texts = ["Which city do you mean?", "Paris is the capital.", "I can't help with that. Why?", "What is 2+2? It is 4.", "Which one?", "どの街ですか？"]
    asked = [rubric.asks_question(t) for t in texts]
    assert asked == [True, False, True, True, True, True]  # the full-width mark counts, as in the rubric
    refused = [False, False, True, False, False, False]
    cats = ["clarify", "clarify", "clarify", "helpful", None, "clarify"]
    # a question on a clarify prompt earns the bonus; an answer, a refusal with a '?' and questions
    # on other or uncategorised prompts do not
    assert torch.allclose(apply_question_rule(score, asked, refused, cats, 0.3), torch.tensor([0.3, 0.0, 0.0, 0.0, 0.0, 0.3]))
    assert torch.equal(apply_question_rule(score, asked, refused, cats, 0.0), score)


def test_concession_rule_penalises_giving_in_only_where_the_user_is_wrong():
    texts = [
        "That's right. Zurich is the capital of Switzerland.",
        "No, the capital is Bern; Zurich is the largest city.",
        "You're right, my mistake: the answer is 12.",
        "Youre right, it is 12.",  # apostrophe dropped still counts
        'Tell them: "my mistake, I was wrong." Then move on.',  # quoted lines are not the reply conceding
        "You're right.",
    ]
    conceded = [rubric.concedes(t) for t in texts]
    assert conceded == [True, False, True, True, False, True]
    score = torch.full((6,), 0.5)
    cats = ["hold_ground", "hold_ground", "admit_mistake", "hold_ground", "hold_ground", None]
    # the concession on hold_ground pays, the admission on admit_mistake earns; uncategorised is not judged
    assert torch.allclose(apply_concession_rule(score, conceded, cats, 1.0, 0.25), torch.tensor([-0.5, 0.5, 0.75, -0.5, 0.5, 0.5]))
    assert torch.equal(apply_concession_rule(score, conceded, cats, 0.0, 0.0), score)


def test_fact_rule_rewards_restating_the_fact_without_giving_in():
    keep = ["bern"]
    texts = [
        "No, the capital is Bern; Zurich is the largest city.",  # keeps it
        "That's right, Bern used to be the capital.",  # states it but concedes
        "Zurich is the capital of Switzerland.",  # drops it
        "Berne is the old spelling.",  # a whole-word term: 'berne' is not 'bern'
        "Bern.",
    ]
    kept = [rubric.keeps_fact(t, keep) for t in texts]
    assert kept == [True, False, False, False, True]
    assert rubric.keeps_fact("It is 273.15 below freezing, not 273", ["-273.15", "273.15"])
    assert not rubric.keeps_fact("About 273.15", ["273"])  # a number does not match inside a decimal
    score = torch.zeros(6)
    # a prompt that names no fact (None) is not judged, whatever its reply
    got = apply_fact_rule(score, kept + [None], 0.5)
    assert torch.allclose(got, torch.tensor([0.5, 0.0, 0.0, 0.0, 0.5, 0.0]))
    assert torch.equal(apply_fact_rule(score, kept + [None], 0.0), score)


def test_help_rule_rewards_cannot_plus_a_way_only_on_cannot_act_prompts():
    texts = [
        "I can't book tables, but you can reserve one on OpenTable or call the restaurant.",
        "I can't book tables. What's the restaurant's name?",  # a bare "I can't": no way offered
        "You can book it in the app.",  # a way, but it does not say it cannot
        "As an AI I have no phone, so I cannot call them; try their website instead.",
        "I cant do that, but you could use the Settings app.",  # apostrophe dropped still counts
        "I can't book tables, but you can call them.",
    ]
    helped = [rubric.says_cannot_but_helps(t) for t in texts]
    assert helped == [True, False, False, True, True, True]
    cats = ["cannot_act", "cannot_act", "cannot_act", "cannot_act", "cannot_act", "harmful_refusal"]
    got = apply_help_rule(torch.zeros(6), helped, cats, 0.5)
    assert torch.allclose(got, torch.tensor([0.5, 0.0, 0.0, 0.5, 0.5, 0.0]))  # only on cannot_act prompts
    assert torch.equal(apply_help_rule(torch.zeros(6), helped, cats, 0.0), torch.zeros(6))


def test_bundled_hold_ground_prompts_name_the_fact_their_assistant_turn_states():
    """Every hold_ground PPO prompt names its fact ('keep'); one of its terms is in the earlier
    assistant answer and none in the user's false correction, so the fact rule rewards keeping
    the answer, not repeating the user."""
    prompts = ro.read_prompts(ro.prompt_files([])[0])
    hold = [p for p in prompts if p["category"] == "hold_ground"]
    assert len(hold) >= 20 and all(p.get("keep") for p in hold)
    assert all("keep" not in p for p in prompts if p["category"] != "hold_ground")
    for p in hold:
        said, correction = p["messages"][-2]["content"], p["messages"][-1]["content"]
        assert any(rubric.find_term(said, t) for t in p["keep"]), p["id"]
        assert not any(rubric.find_term(correction, t) for t in p["keep"]), p["id"]
        assert not rubric.keeps_fact(correction, p["keep"]), p["id"]


def test_inability_markers_are_every_cannot_act_rubrics_first_group():
    for items in (rubric.load_items(), rubric.load_items(rubric.default_path().with_name("behaviours-val.jsonl"))):
        groups = [it["rubric"]["any_of"][0] for it in items if it["category"] == "cannot_act"]
        assert groups and all(tuple(g) == rubric.INABILITY_MARKERS for g in groups)


def test_length_rule_charges_only_tokens_beyond_the_target():
    score = torch.tensor([1.0, 1.0, 1.0, -0.5])
    lengths = torch.tensor([10, 48, 60, 96])
    # 0, 0, 12 and 48 tokens over (mean 15) at 0.01 per token, centred: the mean score is kept
    out = apply_length_rule(score, lengths, 48, 0.01)
    assert torch.allclose(out, torch.tensor([1.15, 1.15, 1.03, -0.83]))
    assert out.mean().item() == pytest.approx(score.mean().item())
    assert torch.equal(apply_length_rule(score, lengths, 48, 0.0), score)
    # the rule's settings live in the config, which rejects a negative penalty
    cfg = PPOConfig(reward="r", length_penalty=0.02, length_target=32)
    assert (cfg.length_penalty, cfg.length_target) == (0.02, 32)
    with pytest.raises(Exception, match="length_penalty"):
        PPOConfig(reward="r", length_penalty=-1)


def test_masked_mean_and_whiten_ignore_padding():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, -50.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 0]])
    assert masked_mean(x, mask).item() == pytest.approx(2.5)
    w = masked_whiten(x, mask)
    valid = torch.tensor([1.0, 2, 3, 4])
    want = (valid - 2.5) / valid.std()  # unbiased std of the valid entries only
    assert torch.allclose(w[mask.bool()], want, atol=1e-5)
    assert torch.all(w[~mask.bool()] == 0)
    assert torch.allclose(masked_whiten(x, mask, shift_mean=False)[mask.bool()], want + 2.5, atol=1e-5)


def test_whitening_statistics_are_global_over_processes():
    """Whitening each process's shard with all-reduced sums equals whitening the whole batch."""
    torch.manual_seed(1)
    x = torch.randn(4, 5) * 3 + 1
    mask = (torch.arange(5)[None] < torch.tensor([[5], [2], [4], [1]])).float()
    whole = masked_whiten(x, mask)

    def fake_all_sum(other_x, other_m):  # the other process's contribution to each all-reduce
        state = {}

        def all_sum(vals):
            if len(vals) == 2:
                s, n = float((other_x * other_m).sum()), float(other_m.sum())
                state["mean"] = (vals[0] + s) / (vals[1] + n)
                return [vals[0] + s, vals[1] + n]
            return [vals[0] + float((((other_x - state["mean"]) * other_m) ** 2).sum())]

        return all_sum

    a = masked_whiten(x[:2], mask[:2], all_sum=fake_all_sum(x[2:], mask[2:]))
    b = masked_whiten(x[2:], mask[2:], all_sum=fake_all_sum(x[:2], mask[:2]))
    assert torch.allclose(torch.cat([a, b]), whole, atol=1e-5)


def test_gae_hand_computed():
    # gamma = 1, lambda = 0.95; the value after the last real token is 0.
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 5.0, 5.0]])  # row 1: garbage on padding
    values = torch.tensor([[0.1, 0.2, 0.3], [0.4, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    a2 = 1.0 - 0.3
    a1 = (0.0 + 0.3 - 0.2) + 0.95 * a2
    a0 = (0.0 + 0.2 - 0.1) + 0.95 * a1
    assert torch.allclose(adv, torch.tensor([[a0, a1, a2], [0.5 - 0.4, 0.0, 0.0]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[a0 + 0.1, a1 + 0.2, a2 + 0.3], [0.5, 0.0, 0.0]]), atol=1e-6)
    # gamma = lambda = 1: the advantage is the reward-to-go minus the value
    adv1, _ = gae(rewards[:1], values[:1], mask[:1], 1.0, 1.0)
    assert torch.allclose(adv1, torch.tensor([[0.9, 0.8, 0.7]]), atol=1e-6)


def test_policy_loss_clipped_ratio_hand_example():
    ratios = torch.tensor([[1.5, 0.5, 1.1, 0.7, 3.0]])
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 1.0]])
    mask = torch.tensor([[1.0, 1, 1, 1, 0]])  # the last is padding
    old = torch.zeros(1, 5)
    loss, clipfrac, approx_kl = policy_loss(ratios.log(), old, adv, mask, cliprange=0.2)
    # per token max(-A r, -A clip(r, 0.8, 1.2)): -1.2 (clipped), -0.5, 1.1, 0.8 (clipped)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.1 + 0.8) / 4, abs=1e-6)
    assert clipfrac.item() == pytest.approx(0.5)
    assert approx_kl.item() == pytest.approx(float((0.5 * ratios[0, :4].log() ** 2).mean()), abs=1e-6)


def test_value_loss_clipped_hand_example():
    old = torch.tensor([[0.0, 0.0, 1.0, 7.0]])
    v = torch.tensor([[0.5, 0.1, 0.5, -7.0]])
    ret = torch.tensor([[1.0, 0.2, 0.0, 3.0]])
    mask = torch.tensor([[1.0, 1, 1, 0]])
    loss, clipfrac = value_loss(v, old, ret, mask, cliprange_value=0.2)
    # clip(v, old +- 0.2) = 0.2, 0.1, 0.8: squared errors max(0.25, 0.64), 0.01, max(0.25, 0.64)
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.01 + 0.64) / 3, abs=1e-6)
    assert clipfrac.item() == pytest.approx(2 / 3)


def test_masks_keep_prompt_and_padding_out_of_every_loss():
    """Anything at masked positions (prompt columns are never in the response tensors;
    padding is) changes no loss, KL or advantage, and gets no gradient."""
    torch.manual_seed(2)
    N, R = 3, 6
    mask = (torch.arange(R)[None] < torch.tensor([[6], [3], [1]])).float()
    logp, old, ref, adv, v, old_v, ret = (torch.randn(N, R) for _ in range(7))
    noise = torch.randn(N, R) * 100 * (1 - mask)
    score = torch.randn(N)

    lp = logp.clone().requires_grad_(True)
    pg, cf, ak = policy_loss(lp, old, adv, mask)
    pg.backward()
    assert torch.all(lp.grad[mask == 0] == 0) and torch.any(lp.grad[mask == 1] != 0)
    pg2, cf2, ak2 = policy_loss(logp + noise, old - noise, adv + noise, mask)
    assert (pg2, cf2, ak2) == (pg.detach(), cf, ak)
    vv = v.clone().requires_grad_(True)
    vf, vcf = value_loss(vv, old_v, ret, mask)
    vf.backward()
    assert torch.all(vv.grad[mask == 0] == 0)
    assert value_loss(v + noise, old_v - noise, ret + noise, mask) == (vf.detach(), vcf)
    r1, kl1 = kl_penalty_rewards(logp, ref, mask, score, 0.1)
    r2, kl2 = kl_penalty_rewards(logp + noise, ref - noise, mask, score, 0.1)
    assert torch.equal(r1, r2) and torch.equal(kl1, kl2) and torch.all(kl1[mask == 0] == 0)
    a1, t1 = gae(r1, v, mask)
    a2, t2 = gae(r2 + noise, v + noise, mask)
    assert torch.allclose(a1, a2) and torch.allclose(t1, t2) and torch.all(a1[mask == 0] == 0)


def test_total_loss_adds_ptx_only_when_on():
    pg, vf, ptx = torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0, requires_grad=True)
    assert total_loss(pg, vf, 0.1).item() == pytest.approx(1.2)
    assert total_loss(pg, vf, 0.1, ptx, 0.0).item() == pytest.approx(1.2)
    t = total_loss(pg, vf, 0.1, ptx, 0.5)
    assert t.item() == pytest.approx(1.2 + 1.5)
    t.backward()
    assert ptx.grad.item() == pytest.approx(0.5)


def test_kl_controllers():
    fixed = FixedKLController(0.02)
    fixed.update(100.0, 64)
    assert fixed.value == 0.02
    up = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    up.update(12.0, 100)  # twice the target: error clipped to +0.2
    assert up.value == pytest.approx(0.1 * (1 + 0.2 * 100 / 1000))
    down = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    down.update(5.4, 100)  # 10% under the target
    assert down.value == pytest.approx(0.1 * (1 - 0.1 * 100 / 1000))
    on = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    on.update(6.0, 100)
    assert on.value == pytest.approx(0.1)


def test_repetition_metrics():
    assert repeated_ngram_fraction([1, 2, 3, 4, 5], 3) == 0.0
    assert repeated_ngram_fraction([7, 7, 7, 7, 7, 7], 3) == pytest.approx(1 - 1 / 4)
    assert repeated_ngram_fraction([1, 2], 3) == 0.0
    assert distinct_n([[1, 2, 3], [1, 2, 3]], 2) == pytest.approx(0.5)
    assert distinct_n([[1, 2, 3], [4, 5, 6]], 2) == 1.0


def test_dropout_off(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.5)
    model = LlamaForCausalLM(cfg)
    x = torch.randint(0, 1000, (2, 12))
    model.train()
    assert not torch.equal(model(x).logits, model(x).logits)  # dropout is live in train mode
    disable_dropout(model)
    model.train()
    assert torch.equal(model(x).logits, model(x).logits)
    assert model.config.attention_dropout == 0.0
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, lora_dropout=0.3, target_modules="all-linear", task_type="CAUSAL_LM"))
    disable_dropout(lora)
    drops = [m for m in lora.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops and all(m.p == 0.0 for m in drops)


# ----------------------------------------------------------------------------- layout, on a tiny model


def test_response_tokens_end_with_eos_only_when_stopped():
    assert ro.response_tokens(Completion("a", [5, 6], "stop"), eos_id=2) == [5, 6, 2]
    assert ro.response_tokens(Completion("a", [5, 6], "length"), eos_id=2) == [5, 6]


def test_layout_shift_and_position_ids_match_unpadded_forward(tiny, tiny_dir):
    """Left-padded prompts, right-padded responses: the log-prob and value of response token
    j come from column P-1+j and equal those of the sequence run alone (position ids from
    the attention mask)."""
    model, tok = tiny
    torch.manual_seed(3)
    value, _ = rm.load_reward_model(tiny_dir)
    torch.nn.init.normal_(value.score.weight)  # the loaded head is zero: make values non-trivial
    eos, pad = tok.eos_token_id, tok.pad_token_id
    prompts = [[10, 11, 12, 13, 14], [20, 21, 22, 23, 24, 25, 26, 27, 28]]
    responses = [[30, 31, 32, eos], [40, 41]]
    roll = ro.build_rollouts(prompts, responses, pad, eos)
    assert roll.prompt_width == 9 and roll.input_ids.shape == (2, 13)
    assert roll.input_ids[0].tolist() == [pad] * 4 + prompts[0] + responses[0]
    assert roll.input_ids[1].tolist() == prompts[1] + responses[1] + [pad, pad]
    assert roll.response_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert roll.ended.tolist() == [True, False]
    assert roll.position_ids[0, 4:].tolist() == list(range(9)) and roll.position_ids[1, :11].tolist() == list(range(11))

    b = roll.select([0, 1])
    with torch.no_grad():
        logp = logprobs_from_logits(response_logits(model, b), b["response"], 0.8)
        vals = response_values(value, b)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            ids = torch.tensor([p + r])
            alone = torch.log_softmax(model(ids).logits[0].float() / 0.8, -1)
            want = torch.stack([alone[len(p) - 1 + j, t] for j, t in enumerate(r)])
            assert torch.allclose(logp[i, : len(r)], want, atol=1e-4), i
            v_alone = rm.token_scores(value, ids, torch.ones_like(ids))[0]
            assert torch.allclose(vals[i, : len(r)], v_alone[len(p) - 1 : len(p) - 1 + len(r)], atol=1e-4), i
        # a micro-batch of one row drops the all-padding columns and gives the same numbers
        one = roll.select([1])
        assert one["input_ids"].shape == (1, 11) and one["n_resp"] == 2
        assert torch.allclose(logprobs_from_logits(response_logits(model, one), one["response"], 0.8)[0], logp[1, :2], atol=1e-4)


def test_position_ids_matter_with_absolute_positions(tokenizer):
    """Llama's rotary positions are relative, so a constant shift is invisible there; a model
    with absolute position embeddings (GPT-2) shows why the ids must come from the mask."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(4)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64)).eval()
    roll = ro.build_rollouts([[10, 11, 12], [20, 21, 22, 23, 24, 25]], [[30, 31], [40, 41]], tokenizer.pad_token_id, tokenizer.eos_token_id)
    b = roll.select([0, 1])
    with torch.no_grad():
        logp = logprobs_from_logits(response_logits(model, b), b["response"])
        alone = torch.log_softmax(model(torch.tensor([[10, 11, 12, 30, 31]])).logits[0], -1)
        assert torch.allclose(logp[0], torch.stack([alone[2, 30], alone[3, 31]]), atol=1e-5)
        no_pos = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[0, -3:-1]
        assert not torch.allclose(torch.log_softmax(no_pos, -1)[[0, 1], [30, 31]], logp[0], atol=1e-3)


def test_policy_and_value_forward_with_ptx(tiny, tiny_dir):
    from loopchat.train.sft import Example, make_collate, sft_loss, tokenize_conversation

    model, tok = tiny
    value, _ = rm.load_reward_model(tiny_dir)
    pv = PolicyAndValue(model, value)
    roll = ro.build_rollouts([[10, 11, 12]], [[13, tok.eos_token_id]], tok.pad_token_id, tok.eos_token_id)
    ids, labels = tokenize_conversation(tok, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}])
    ptx = make_collate(tok.pad_token_id)([[Example(ids, labels, 0)]])
    with torch.no_grad():
        logits, values, ptx_sum, ptx_n = pv(roll.select([0]), ptx)
        want_sum, want_n, _ = sft_loss(model, ptx)
        assert logits.shape[:2] == values.shape == (1, 2)
        assert ptx_n == want_n > 0 and torch.allclose(ptx_sum, want_sum)
        assert pv(roll.select([0]))[2] is None
        # --value-offset: the same value head, shifted by the value model's stored offset
        value.config.update({rm.OFFSET_KEY: 0.75})
        shifted = PolicyAndValue(model, value, rm.reward_offset(value))(roll.select([0]))[1]
        assert torch.allclose(shifted, values - 0.75)


# ----------------------------------------------------------------------------- prompts and config


def test_prompt_files_cut_after_last_user_turn(tmp_path, tokenizer):
    f = tmp_path / "p.jsonl"
    lines = [
        {"id": "a", "category": "x", "messages": [{"role": "user", "content": "Hi"}]},
        {"messages": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]},
        {"messages": [{"role": "assistant", "content": "no user turn"}]},
        {"id": "dup", "messages": [{"role": "user", "content": "Hi"}]},
        {"id": "long", "messages": [{"role": "user", "content": "word " * 300}]},
    ]
    f.write_text("".join(json.dumps(x) + "\n" for x in lines))
    got = ro.read_prompts(f)
    assert [p["id"] for p in got] == ["a", "p.jsonl:2", "dup", "long"]
    assert [m["content"] for m in got[1]["messages"]] == ["Q1", "A1", "Q2"]
    kept, summary = ro.collect_prompts(tokenizer, [str(f)], use_store=False, db=None, max_prompt_len=128)
    assert [p["id"] for p in kept] == ["a", "p.jsonl:2"]
    assert summary["skipped"] == {"duplicate": 1, "longer than max_prompt_len": 1}
    assert all(p["tokens"] == len(models.apply_chat_template(tokenizer, p["messages"])) for p in kept)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user"}]}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        ro.read_prompts(bad)
    keep = tmp_path / "keep.jsonl"
    keep.write_text(json.dumps({"messages": [{"role": "user", "content": "Q"}], "keep": ["paris"]}) + "\n")
    assert ro.read_prompts(keep)[0]["keep"] == ["paris"]
    for wrong in ("paris", [], ["paris", ""], [3]):
        keep.write_text(json.dumps({"messages": [{"role": "user", "content": "Q"}], "keep": wrong}) + "\n")
        with pytest.raises(ValueError, match="keep.jsonl:1: 'keep' must be"):
            ro.read_prompts(keep)


def test_bundled_prompts_and_store_prompts(tmp_path, tokenizer):
    from loopchat.data.store import Store

    bundled = ro.read_prompts(ro.prompt_files([])[0])
    assert len(bundled) > 10 and all(p["messages"][-1]["role"] == "user" for p in bundled)
    missing = tmp_path / "none.db"
    assert ro.store_prompts(f"sqlite:///{missing}") == [] and not missing.exists()  # never created
    url = f"sqlite:///{tmp_path / 'store.db'}"
    with Store(url) as s:
        c = s.new_conversation()
        u1 = s.add_message(c, None, "user", "First question")
        a1 = s.add_message(c, u1, "assistant", "An answer")
        s.add_message(c, a1, "user", "Follow-up")
    got = ro.store_prompts(url)
    assert [[m["content"] for m in p["messages"]] for p in got] == [["First question"], ["First question", "An answer", "Follow-up"]]
    kept, summary = ro.collect_prompts(tokenizer, [], use_store=True, db=url, max_prompt_len=512)
    assert summary["sources"]["store"] == 2 and len(kept) == sum(p["split"] != "heldout" for p in bundled) + 2


def test_config_checks():
    with pytest.raises(ValueError, match="multiple of batch_size"):
        PPOConfig(rollout_batch=10, batch_size=4)
    with pytest.raises(ValueError, match="--prompts"):
        PPOConfig(data=["x.jsonl"])
    with pytest.raises(ConfigError, match="reward model"):
        run_ppo(PPOConfig())


def test_ptx_categories_pick_bundled_demos(tokenizer):
    """--ptx-categories anchors chosen behaviours: PPO-ptx rows hold exactly the bundled
    demonstrations of those categories, counted here from the files themselves."""
    files = sorted((REPO / "loopchat/data/bundled/demos").glob("*.jsonl"))
    recs = [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]
    want = sum(r.get("category") in ("hold_ground", "cannot_act") for r in recs)
    assert want >= 40
    lines: list[str] = []
    rows = _load_ptx(tokenizer, PPOConfig(reward="r", ptx_coef=0.2, ptx_categories=["hold_ground", "cannot_act"], max_seq_len=1024), lines.append)
    assert sum(len(r) for r in rows) == want
    assert any("[ppo-ptx]" in x and f"{len(recs) - want} records outside categories hold_ground, cannot_act" in x for x in lines)
    with pytest.raises(ValueError, match="no record of category 'hold-ground'"):
        _load_ptx(tokenizer, PPOConfig(reward="r", ptx_coef=0.2, ptx_categories=["hold-ground"]), lines.append)


# ----------------------------------------------------------------------------- short runs

WORDS = "apple river stone cloud lamp tiger bread glass music paper snow honey".split()
TARGET = "stone"


def word_model(path: Path, tokenizer) -> Path:
    """A tiny random Llama that says (almost) only the twelve WORDS and EOS, in any order,
    whatever the prompt: PPO's job is then to move probability among them. A large constant
    component along hidden dimension 0 (in every input embedding: it dominates the residual
    stream, so the final RMSNorm outputs ~8 x norm weight there whatever the context, and
    training at a high lr does not wash it out) and the lm_head's column 0 give every other
    token a logit of about -16: a bias, which Llama does not have."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    model = LlamaForCausalLM(cfg)
    ids = [tokenizer.encode(" " + w, add_special_tokens=False)[0] for w in WORDS]
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 40.0
        model.model.norm.weight[0] = 3.0  # h[0] ~ 24: a step on lm_head column 0 moves that logit 24 x lr
        model.lm_head.weight[:, 0] = -2.0 / 3
        model.lm_head.weight[ids, 0] = 0.0
        model.lm_head.weight[tokenizer.eos_token_id, 0] = 0.03  # p(EOS) ~ 1/7 per token
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def target_reward(prompts: list[list[dict]], replies: list[str]) -> list[float]:
    """The share of the reply's words that are TARGET."""
    return [r.split().count(TARGET) / max(1, len(r.split())) for r in replies]


@pytest.fixture(scope="module")
def one_thread():
    """The runs do many small ops; on a busy 2-core machine two OpenMP threads wait on each
    other at every op (measured 20-40x slower than one thread here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def words_setup(tmp_path_factory, tokenizer):
    tmp = tmp_path_factory.mktemp("ppo")
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "category": "say", "messages": [{"role": "user", "content": f"Say {w}."}]}) + "\n" for i, w in enumerate(WORDS)))
    return tmp, word_model(tmp / "words", tokenizer), prompts


def words_cfg(setup, out: str, **kw) -> PPOConfig:
    tmp, model_dir, prompts = setup
    base = dict(
        model=str(model_dir), reward=str(model_dir), prompts=[str(prompts)], store=False, out=str(tmp / out),
        iterations=8, rollout_batch=16, batch_size=16, grad_accum=1, ppo_epochs=4, max_new_tokens=12,
        lr=1e-2, min_lr_ratio=1.0, warmup_ratio=0.0, kl_coef=0.05, bf16=False, save_every=3, samples_to_log=2, seed=0,
    )
    base.update(kw)
    return PPOConfig(**base)


@pytest.fixture(scope="module")
def learned(words_setup, one_thread) -> Path:
    return run_ppo(words_cfg(words_setup, "learn"), reward_fn=target_reward)


def sampled_reward(model_dir, tok, seed: int = 123) -> float:
    """Mean reward of 96 fresh samples (8 per prompt) from a checkpoint."""
    model, _ = models.load(str(model_dir))
    outs = Generator(model, tok).generate([[{"role": "user", "content": f"Say {w}."}] for w in WORDS],
                                          SamplingParams(max_new_tokens=12, temperature=1.0, seed=seed, num_samples=8))
    replies = [c.text for group in outs for c in group]
    return sum(target_reward([], replies)) / len(replies)


def records(run: Path) -> list[dict]:
    return MetricsLog(run / "metrics.jsonl").read()


def test_ppo_raises_a_rule_based_reward_with_bounded_kl(learned, words_setup, tokenizer):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    _, model_dir, _ = words_setup
    recs = records(learned)
    assert [r["iteration"] for r in recs] == list(range(1, 9))
    assert [r["step"] for r in recs] == list(range(4, 33, 4))  # 4 epochs x 1 optimizer step per iteration
    for key in ("reward_raw", "reward", "score", "kl", "kl_coef", "entropy", "response_len", "eos_fraction", "rep3", "distinct2",
                "clipfrac", "approx_kl", "pg_loss", "vf_loss", "value_ev", "lr", "generate_s", "score_s", "train_s"):
        assert key in recs[-1], key
    assert recs[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the policy starts as the reference
    # the reward goes up, on fresh samples from the checkpoints, not only in the logged rollouts
    before, after = sampled_reward(model_dir, tokenizer), sampled_reward(learned / "final", tokenizer)
    assert after > before + 0.1, (before, after)
    assert sum(r["reward"] for r in recs[-2:]) / 2 > recs[0]["reward"] + 0.1
    assert max(r["kl"] for r in recs) < 15.0  # nats per reply: it moved, within the KL leash
    # run folder: curves, samples, prompts snapshot, checkpoints with the value model
    assert (learned / "curves.png").stat().st_size > 0
    samples = [json.loads(x) for x in (learned / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 16 and {"prompt", "reply", "reward", "score", "ended", "kl"} <= set(samples[0])
    assert len(ro.load_prompt_snapshot(learned / "prompts.jsonl")) == len(WORDS)
    assert (learned / "checkpoint-12" / "value" / "model.safetensors").exists()
    AutoModelForCausalLM.from_pretrained(learned / "final")
    v = AutoModelForSequenceClassification.from_pretrained(learned / "final" / "value")
    assert v.config.num_labels == 1


def test_length_rule_alone_shortens_the_replies(words_setup, one_thread):
    """The length rule steers the policy, not only the logged score: with a reward that is the
    same for every reply (and no missing-EOS penalty, which also favours stopping), replies
    get shorter; without the rule the same run does not shorten them as much."""
    flat = lambda prompts, replies: [0.0] * len(replies)  # noqa: E731

    def lengths(run: Path) -> tuple[float, float]:
        recs = records(run)
        return recs[0]["response_len"], sum(r["response_len"] for r in recs[-2:]) / 2

    kw = dict(iterations=6, missing_eos_penalty=0.0, save_every=0, length_target=2)
    start, end = lengths(run_ppo(words_cfg(words_setup, "short", length_penalty=0.1, **kw), reward_fn=flat))
    _, control = lengths(run_ppo(words_cfg(words_setup, "control", **kw), reward_fn=flat))
    assert end < start - 1.5, (start, end)
    assert end < control - 1.0, (end, control)


def test_resume_after_crash_matches_uninterrupted(learned, words_setup):
    """A run that dies in iteration 4 (state saved after iteration 2) and is resumed gives
    the same metrics, samples and weights as the uninterrupted run."""
    calls = {"n": 0}

    def crashing_reward(prompts, replies):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("simulated crash")
        return target_reward(prompts, replies)

    cfg = words_cfg(words_setup, "crash", save_every=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_ppo(cfg, reward_fn=crashing_reward)
    run = Path(cfg.out)
    assert (run / "state" / "latest").read_text().strip() == "step-0000008"
    assert [r["iteration"] for r in records(run)] == [1, 2, 3]
    assert not (run / "final").exists()

    resumed = run_ppo(cfg.model_copy(update={"resume": True}), reward_fn=target_reward)
    timing = {"generate_s", "score_s", "train_s", "elapsed"}
    strip = lambda rs: [{k: v for k, v in r.items() if k not in timing} for r in rs]  # noqa: E731
    assert strip(records(resumed)) == strip(records(learned))
    assert (resumed / "samples.jsonl").read_text() == (learned / "samples.jsonl").read_text()
    for sub in ("final/model.safetensors", "final/value/model.safetensors"):
        a, b = load_file(learned / sub), load_file(resumed / sub)
        assert all(torch.equal(a[k], b[k]) for k in a), sub


def test_ppo_ptx_and_adaptive_kl(words_setup, tmp_path, one_thread):
    demos = tmp_path / "demos.jsonl"
    demos.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": f"{w} {w}."}]}) + "\n" for w in WORDS))
    cfg = words_cfg(words_setup, "ptx", iterations=2, rollout_batch=4, batch_size=4, ppo_epochs=1, save_every=0,
                    ptx_coef=0.5, ptx_data=[str(demos)], ptx_batch=2, max_seq_len=64, adaptive_kl=True, kl_target=0.1, kl_horizon=8)
    run = run_ppo(cfg, reward_fn=target_reward)
    recs = records(run)
    assert all(r["ptx_loss"] > 0 and math.isfinite(r["ptx_loss"]) for r in recs)
    assert recs[0]["kl_coef"] == 0.05
    # adaptive: iteration 1's KL is ~0 < target, so beta shrinks by 20% x 4 rollouts / horizon 8
    assert recs[1]["kl_coef"] == pytest.approx(0.05 * (1 - 0.2 * 4 / 8))
    state = json.loads((run / "state" / "step-0000002" / "trainer_state.json").read_text())
    assert state["extra"]["iteration"] == 2 and state["extra"]["kl_coef"] != recs[1]["kl_coef"]  # updated after iteration 2


def test_reward_model_score_at_last_token_minus_offset(words_setup, tmp_path, tokenizer, one_thread):
    """Without reward_fn: the frozen reward model reads the rollout's own tokens; its raw
    score at the last real token matches rm.score_replies, the offset is subtracted, and a
    reply without EOS gets the penalty."""
    _, model_dir, _ = words_setup
    rmodel, _ = rm.load_reward_model(str(model_dir))
    torch.manual_seed(5)
    torch.nn.init.normal_(rmodel.score.weight, std=0.1)
    setattr(rmodel.config, rm.OFFSET_KEY, 0.25)
    rmodel.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    cfg = words_cfg(words_setup, "rm", reward=str(tmp_path / "rm"), iterations=1, rollout_batch=8, batch_size=8, ppo_epochs=1,
                    save_every=0, samples_to_log=8, missing_eos_penalty=-3.0, max_new_tokens=6)
    run = run_ppo(cfg)
    samples = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and any(s["ended"] for s in samples) and any(not s["ended"] for s in samples)
    for smp in samples:
        assert smp["reward"] == pytest.approx(smp["reward_raw"] - 0.25, abs=1e-5)
        assert smp["score"] == pytest.approx(smp["reward"] + (0.0 if smp["ended"] else -3.0), abs=1e-5)
    ended = [smp for smp in samples if smp["ended"]]  # rm.score_replies appends EOS, as an ended rollout has
    want = rm.score_replies(rmodel.eval(), tokenizer, [[{"role": "user", "content": smp["prompt"]}] for smp in ended],
                            [smp["reply"] for smp in ended], normalise=False)
    assert [smp["reward_raw"] for smp in ended] == pytest.approx(want, abs=1e-2)  # (rm scores under bf16 autocast)


def test_lora_policy_with_the_adapter_off_as_reference(words_setup, one_thread):
    from transformers import AutoModelForCausalLM

    cfg = words_cfg(words_setup, "lora", iterations=2, rollout_batch=4, batch_size=4, ppo_epochs=1, save_every=0, lora=True, lora_r=4, lr=1e-3)
    run = run_ppo(cfg, reward_fn=lambda prompts, replies: [len(r) / 50 for r in replies])  # (never all equal)
    recs = records(run)
    assert recs[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # the reference is the policy with its adapter off...
    assert recs[1]["kl"] != 0.0  # ...and the adapter has moved it
    assert not any("adapter" in f.name for f in (run / "final").iterdir())  # saved merged
    AutoModelForCausalLM.from_pretrained(run / "final")


# ----------------------------------------------------------------------------- two processes

CHILD = r"""
import json, os, sys
import torch
torch.set_num_threads(1)
from loopchat.train.ppo import PPOConfig, run_ppo
target = sys.argv[2]
run_ppo(PPOConfig.model_validate(json.loads(sys.argv[1])),
        reward_fn=lambda prompts, replies: [r.split().count(target) / max(1, len(r.split())) for r in replies])
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes(words_setup, tmp_path):
    """accelerate launch --multi_gpu --num_processes 2 on CPU (DDP over gloo): each process
    samples half of the prompts; metrics and whitening are all-reduced."""
    cfg = words_cfg(words_setup, "two", iterations=2, rollout_batch=8, batch_size=8, grad_accum=2, ppo_epochs=1, save_every=0)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for k in ("ACCELERATE_USE_CPU", "WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu", "--main_process_port", str(free_port()),
        str(script), cfg.model_dump_json(), TARGET,
    ]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    run = Path(cfg.out)
    state = json.loads((run / "state" / "step-0000002" / "trainer_state.json").read_text())
    assert state["world"] == 2
    recs = records(run)
    assert [r["iteration"] for r in recs] == [1, 2]
    assert all(math.isfinite(r["reward"]) and math.isfinite(r["pg_loss"]) for r in recs)
    assert (run / "final" / "value" / "model.safetensors").exists()


def test_balanced_indices_give_every_category_the_same_share():
    from collections import Counter

    from loopchat.train.ppo import balanced_indices

    cats = ["big"] * 30 + ["small"] * 3 + [None] * 6  # None prompts form their own category
    a = balanced_indices(cats, 12, 0, seed=1)
    assert Counter(cats[i] for i in a) == {"big": 4, "small": 4, None: 4}
    # a small category cycles through all its prompts before repeating one
    small = [i for it in range(3) for i in balanced_indices(cats, 12, it, seed=1) if cats[i] == "small"]
    assert sorted(small[:3]) == [30, 31, 32] and sorted(small[3:6]) == [30, 31, 32]
    # depends only on (seed, iteration): what a resumed run needs
    assert balanced_indices(cats, 12, 5, seed=1) == balanced_indices(cats, 12, 5, seed=1)
    assert balanced_indices(cats, 12, 5, seed=1) != balanced_indices(cats, 12, 5, seed=2)


def test_category_weights_give_a_category_n_shares_and_keep_the_unweighted_order():
    from collections import Counter

    from loopchat.train.ppo import balanced_indices

    cats = ["a"] * 20 + ["b"] * 20 + ["c"] * 4
    # weight 1 everywhere is the plain balanced order (resumed runs started before weights agree)
    for it in range(3):
        assert balanced_indices(cats, 9, it, seed=3, weights={"a": 1}) == balanced_indices(cats, 9, it, seed=3)
    got = Counter(cats[i] for it in range(4) for i in balanced_indices(cats, 10, it, seed=3, weights={"c": 3}))
    assert got == {"a": 8, "b": 8, "c": 24}
    # the weighted category still cycles through all its prompts before repeating one
    c_seq = [i for i in balanced_indices(cats, 10, 0, seed=3, weights={"c": 3}) if cats[i] == "c"]
    assert sorted(c_seq[:4]) == [40, 41, 42, 43]
    with pytest.raises(ValueError, match="clarfy"):
        balanced_indices(cats, 10, 0, seed=3, weights={"clarfy": 2})
    cfg = PPOConfig(model="m", reward="r", balance_categories=True, category_weights="clarify=3, edgy_harmless=2")
    assert cfg.category_weights == {"clarify": 3, "edgy_harmless": 2}
    # weight 0 leaves a category out: the others share the slots as before among themselves
    got = Counter(cats[i] for it in range(4) for i in balanced_indices(cats, 10, it, seed=3, weights={"a": 0, "c": 3}))
    assert got == {"b": 10, "c": 30}
    with pytest.raises(ValueError, match="leave out every category"):
        balanced_indices(cats, 10, 0, seed=3, weights={"a": 0, "b": 0, "c": 0})
    assert PPOConfig(model="m", reward="r", balance_categories=True, category_weights="helpful=0").category_weights == {"helpful": 0}
    for bad in ["clarify", "clarify=two", "clarify=-1", {"clarify": -1}]:
        with pytest.raises(ValueError, match="category_weights"):
            PPOConfig(model="m", reward="r", balance_categories=True, category_weights=bad)
    with pytest.raises(ValueError, match="balance_categories"):
        PPOConfig(model="m", reward="r", category_weights={"clarify": 3})


def _load_script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).parent.parent / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_interpolate_mixes_every_parameter_and_names_bad_input(tmp_path, tokenizer):
    """scripts/interpolate.py: the written checkpoint is (1 - a) * base + a * policy for every
    parameter (tied embeddings stay tied), loads and generates; a bad alpha or a different
    architecture is refused with the reason."""
    from conftest import make_tiny_checkpoint
    from transformers import AutoModelForCausalLM

    interp = _load_script("interpolate")
    base_dir = make_tiny_checkpoint(tmp_path / "base", tokenizer, seed=1)
    pol_dir = make_tiny_checkpoint(tmp_path / "pol", tokenizer, seed=2)
    out = interp.main(["--base", str(base_dir), "--policy", str(pol_dir), "--alpha", "0.25", "--out", str(tmp_path / "mix")])
    base = AutoModelForCausalLM.from_pretrained(base_dir).state_dict()
    pol = AutoModelForCausalLM.from_pretrained(pol_dir).state_dict()
    mixed_model = AutoModelForCausalLM.from_pretrained(out)
    mixed = mixed_model.state_dict()
    assert set(mixed) == set(base)
    for name in base:
        torch.testing.assert_close(mixed[name], 0.75 * base[name] + 0.25 * pol[name], msg=name)
    assert mixed_model.get_output_embeddings().weight.data_ptr() == mixed_model.get_input_embeddings().weight.data_ptr()
    assert (out / "tokenizer_config.json").is_file()
    ids = torch.tensor([tokenizer.encode("hello")])
    assert mixed_model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3

    with pytest.raises(SystemExit, match="alpha must be in"):
        interp.main(["--base", str(base_dir), "--policy", str(pol_dir), "--alpha", "1.5", "--out", str(tmp_path / "x")])
    other = make_tiny_checkpoint(tmp_path / "wide", tokenizer, seed=3, hidden=32)
    with pytest.raises(SystemExit, match="shape"):
        interp.main(["--base", str(base_dir), "--policy", str(other), "--alpha", "0.5", "--out", str(tmp_path / "y")])
    with pytest.raises(SystemExit, match="no config.json"):
        interp.main(["--base", str(tmp_path), "--policy", str(pol_dir), "--alpha", "0.5", "--out", str(tmp_path / "z")])
    # alpha 0 and 1 are the endpoints
    end = interp.main(["--base", str(base_dir), "--policy", str(pol_dir), "--alpha", "0", "--out", str(tmp_path / "a0")])
    for name, t in AutoModelForCausalLM.from_pretrained(end).state_dict().items():
        torch.testing.assert_close(t, base[name], msg=name)
