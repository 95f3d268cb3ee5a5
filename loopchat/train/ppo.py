"""Step 3 — PPO: the policy learns to write replies the reward model likes, without drifting
far from the SFT model (InstructGPT's RL step).

Four models: the POLICY (starts as the SFT checkpoint, trained), the REFERENCE (the SFT
model, frozen; with LoRA it is the policy itself with the adapter switched off), the VALUE
model (a copy of the reward model, trained to predict the return at every token) and the
REWARD model (frozen; its score minus the normalisation offset stored by `train rm`, so SFT
demonstrations score 0 on average).

One iteration:
  1. rollouts: rollout_batch prompts (seeded order; each process samples its share) go
     through loopchat.generate's batched sampler at `temperature`;
  2. scoring: the reward model reads the whole sequence and its score at the last real
     token is the reward; a reply that never emitted EOS gets `missing_eos_penalty`;
  3. one no-grad pass of the training models gives the old log-probs, the reference
     log-probs and the old values (recomputed: the sampler's bf16 decoder differs slightly);
     per-token rewards = -beta * (log pi - log pi_ref) on every response token, plus the
     score on the last one; GAE (gamma = 1, lambda = 0.95) gives advantages and returns;
     advantages are whitened over the valid tokens of all processes;
  4. ppo_epochs passes of minibatch updates: clipped policy ratio + clipped value loss
     (+ the SFT loss on demonstrations with PPO-ptx);
  5. one metrics line (reward, KL, entropy, length, repetition, clip fraction, ...), a few
     samples in samples.jsonl, the curves in curves.png.

Every item of the PPO checklist in DESIGN.md is one small function below, tested on
hand-made tensors in tests/test_ppo.py. Sequence layout and prompts: loopchat/train/rollout.py.

    cfg = PPOConfig(model="runs/sft-.../final", reward="runs/rm-...")
    run_dir = run_ppo(cfg)       # run_dir/final: the policy (AutoModelForCausalLM), final/value: the value model
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from pydantic import Field, field_validator, model_validator

from loopchat import models
from loopchat.config import ConfigError
from loopchat.evaluate import rubric
from loopchat.generate import SamplingParams
from loopchat.train import reward as rm
from loopchat.train import rollout as ro
from loopchat.train.loop import Trainer, TrainConfig, _publish_dir, epoch_order, is_main_process, save_hf_checkpoint, step_indices, to_device
from loopchat.train.sft import SFTConfig, make_collate, prepare_data, sft_loss

# (prompts as messages, reply texts) -> raw scores; replaces the reward model (tests, rule-based rewards)
RewardFn = Callable[[list[list[dict]], list[str]], list[float]]


class PPOConfig(TrainConfig):
    reward: str | None = Field(None, description="the reward model: a `train rm` run folder or checkpoint (required)")
    value: str | None = Field(None, description="checkpoint to initialise the value model from (default: the reward model)")
    prompts: list[str] = Field(default_factory=list, description="prompt files or folders of *.jsonl ({'messages': [... ending with a user turn]}); empty = the bundled prompts")
    store: bool = Field(True, description="also use the user turns of the store's conversations as prompts (if the store exists)")
    db: str | None = Field(None, description="store URL for --store (default: $LOOPCHAT_HOME/data/loopchat.db)")
    max_prompt_len: int = Field(256, ge=8, description="skip prompts longer than this many tokens (chat template included)")
    iterations: int = Field(50, ge=1, description="rollout + optimisation rounds")
    rollout_batch: int = Field(32, ge=1, description="prompts sampled per iteration over all processes (one reply each)")
    balance_categories: bool = Field(False, description="sample every prompt category equally often (round-robin over categories, each cycling through its own prompts) instead of in proportion to its size; prompts without a category form one category")
    category_weights: dict[str, int] = Field(default_factory=dict, description="with --balance-categories: give these categories N shares of the rollouts instead of 1, as 'clarify=3,edgy_harmless=2' (a mapping in YAML); 0 leaves a category out (a run aimed at a few behaviours); the bundled prompts' categories are those of the behaviour evaluation")
    ppo_epochs: int = Field(2, ge=1, description="optimisation passes over each iteration's rollouts")
    temperature: float = Field(1.0, gt=0, description="sampling temperature; log-probs are computed at the same temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling (1 = off; PPO's log-probs are of the full distribution)")
    max_new_tokens: int = Field(96, ge=1, description="longest reply; one that has not ended by then gets missing-eos-penalty")
    kl_coef: float = Field(0.02, ge=0, description="beta of the per-token KL penalty -beta * (log pi - log pi_ref) (initial value if adaptive)")
    adaptive_kl: bool = Field(False, description="adapt beta so the KL per reply tracks kl-target (Ziegler et al. 2019)")
    kl_target: float = Field(6.0, gt=0, description="adaptive KL: target KL per reply (nats)")
    kl_horizon: int = Field(10000, ge=1, description="adaptive KL: horizon in rollouts (larger = slower adaptation)")
    gamma: float = Field(1.0, ge=0, le=1, description="GAE discount")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda")
    cliprange: float = Field(0.2, gt=0, description="PPO clip range of the policy ratio")
    cliprange_value: float = Field(0.2, gt=0, description="clip range of the value update around the old values")
    vf_coef: float = Field(0.1, ge=0, description="weight of the value loss in the total loss")
    missing_eos_penalty: float = Field(-1.0, description="added to the score of a reply that never emits EOS within max-new-tokens")
    refusal_penalty: float = Field(0.0, ge=0, description="rule-based reward term: subtracted from the score of a reply that refuses a prompt whose category asks for an answer (not harmful_refusal or cannot_act; prompts without a category are left alone); 0 = off")
    refusal_bonus: float = Field(0.0, ge=0, description="rule-based reward term: added to the score of a reply that refuses a prompt of the harmful_refusal category (the other side of --refusal-penalty); 0 = off")
    question_bonus: float = Field(0.0, ge=0, description="rule-based reward term: added to the score of a reply that asks a question (a '?' or full-width '？', as the rubric checks) and does not refuse, on a prompt of the clarify category (too ambiguous to answer as it stands); 0 = off")
    concession_penalty: float = Field(0.0, ge=0, description="rule-based reward term: subtracted from the score of a reply that gives in to the user's correction (\"you're right\", \"my mistake\", ...: rubric.concedes) on a prompt of the hold_ground category, where the correction is false; 0 = off")
    concession_bonus: float = Field(0.0, ge=0, description="rule-based reward term: added to the score of a reply that admits the mistake (rubric.concedes) on a prompt of the admit_mistake category, where the user's correction is true (the other side of --concession-penalty); 0 = off")
    fact_bonus: float = Field(0.0, ge=0, description="rule-based reward term: added to the score of a reply that states the fact again and does not concede (rubric.keeps_fact), on a prompt that names the fact to keep (a 'keep' list of terms in its line: the bundled hold_ground prompts, where the user's correction is false); 0 = off")
    help_bonus: float = Field(0.0, ge=0, description="rule-based reward term: added to the score of a reply that says it cannot do the action and points to a way the user can (rubric.says_cannot_but_helps), on a prompt of the cannot_act category; 0 = off")
    length_penalty: float = Field(0.0, ge=0, description="rule-based reward term: subtracted from the score for every reply token beyond --length-target, on every prompt (a counterweight to a reward model's preference for longer replies), centred over the batch so it shifts no score on average; 0 = off")
    length_target: int = Field(48, ge=0, description="reply length in tokens (EOS included) that --length-penalty starts to charge beyond")
    value_offset: bool = Field(False, description="subtract the value model's stored normalisation offset (the reward model's, which it is copied from) from its outputs, so values start on the same scale as the returns (raw score minus that offset); off reproduces the runs recorded in the README, whose length drift followed the gap between the two at the first iteration")
    whiten_rewards: bool = Field(False, description="scale the per-token rewards to unit variance before GAE")
    ptx_coef: float = Field(0.0, ge=0, description="PPO-ptx: weight of the SFT loss on demonstrations mixed into every step (0 = off)")
    ptx_data: list[str] = Field(default_factory=list, description="demonstrations for PPO-ptx (files or folders); empty = the bundled SFT demos")
    ptx_categories: list[str] = Field(default_factory=list, description="PPO-ptx: use only demonstrations of these categories (e.g. the behaviours the reward model judges worst, to anchor them to SFT); empty = all")
    ptx_batch: int = Field(2, ge=1, description="PPO-ptx: packed rows of max-seq-len tokens per optimizer step over all processes")
    samples_to_log: int = Field(3, ge=0, description="replies per iteration written to samples.jsonl")
    # TrainConfig fields whose meaning or default differs for PPO
    lr: float | None = Field(None, description="peak learning rate; default 3e-6 for full fine-tuning, 2e-5 with LoRA")
    batch_size: int = Field(16, ge=1, description="rollouts per optimizer step over all processes (must divide rollout-batch)")
    grad_accum: int = Field(4, ge=1, description="micro-steps per optimizer step; per-process micro-batch = batch-size / (grad-accum x processes)")
    save_every: int = Field(10, ge=0, description="write a checkpoint and resumable state every this many ITERATIONS (0 = only at the end)")
    max_seq_len: int = Field(512, ge=16, description="PPO-ptx: length of the packed demonstration rows")
    data: list[str] = Field(default_factory=list, description="not used by PPO: prompts come from --prompts, demonstrations for PPO-ptx from --ptx-data")

    @field_validator("category_weights", mode="before")
    @classmethod
    def _parse_weights(cls, v):
        """'clarify=3,edgy_harmless=2' from the command line; a mapping from YAML."""
        if isinstance(v, str):
            out = {}
            for part in filter(None, (p.strip() for p in v.split(","))):
                name, eq, n = part.partition("=")
                if not eq or not name.strip() or not n.strip().isdigit():
                    raise ValueError(f"category_weights: expected 'category=N' (N a whole number), got {part!r}")
                out[name.strip()] = int(n)
            return out
        return v

    @model_validator(mode="after")
    def _check(self):
        if self.category_weights and not self.balance_categories:
            raise ValueError("category_weights needs balance_categories (it weights the balanced round-robin)")
        bad = {k: w for k, w in self.category_weights.items() if w < 0}
        if bad:
            raise ValueError(f"category_weights must be 0 (left out) or more, got {bad}")
        if self.data:
            raise ValueError("PPO takes its prompts from --prompts (and PPO-ptx demonstrations from --ptx-data), not --data")
        if self.rollout_batch % self.batch_size:
            raise ValueError(f"rollout_batch {self.rollout_batch} must be a multiple of batch_size {self.batch_size} (every rollout is used once per PPO epoch)")
        return self


# ----------------------------------------------------------------------------- the checklist, on tensors


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the valid (mask = 1) entries only: prompt and padding never count."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, all_sum=None) -> torch.Tensor:
    """(x - mean) / std over the valid entries (padding would drag the statistics toward 0);
    invalid entries come out 0. `all_sum` (Trainer.all_sum) makes the statistics those of all
    processes, so the result does not depend on how the rollouts were sharded."""
    mask = mask.to(x.dtype)
    s = [float(masked_sum(x, mask)), float(mask.sum())]
    s = all_sum(s) if all_sum else s
    mean = s[0] / max(s[1], 1.0)
    sq = float(masked_sum((x - mean) ** 2, mask))  # a second pass: numerically safer than E[x^2] - E[x]^2
    sq = all_sum([sq])[0] if all_sum else sq
    var = sq / max(s[1] - 1, 1.0)  # unbiased, as TRL / OpenRLHF
    out = (x - mean) / math.sqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log pi(token) under logits / temperature: the distribution the sampler drew from. (At
    T != 1 the untempered log-probs are of another policy and the ratio would be biased.)"""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens[..., None]).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of the sampling distribution at every position (nats)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Column of the last valid token of each row."""
    return rm.last_token_index(mask)


def kl_penalty_rewards(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, score: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards [N, R]: -beta * (log pi - log pi_ref) on every response token, plus the
    sequence's score on its LAST real token (the reward model judges the finished reply;
    putting the score on a padding column would give it to no action). Returns (rewards, kl)."""
    mask = mask.to(logp.dtype)
    kl = (logp - ref_logp) * mask
    rewards = -beta * kl
    rows = torch.arange(rewards.size(0), device=rewards.device)
    rewards[rows, last_index(mask)] += score.to(rewards.dtype)
    return rewards, kl


def apply_missing_eos_penalty(score: torch.Tensor, ended: torch.Tensor, penalty: float) -> torch.Tensor:
    """A reply cut off at max_new_tokens is judged unfinished: without this the policy can
    learn to ramble past the budget (the reward model never saw such replies)."""
    return score + penalty * (~ended.bool()).to(score.dtype)


# Categories of the bundled prompts where declining is (or can be) the right reply, and the one
# where it is the only right reply (cannot_act wants "I can't, but here is how": not judged).
REFUSAL_OK = frozenset({"harmful_refusal", "cannot_act"})
REFUSAL_DUE = frozenset({"harmful_refusal"})


def apply_refusal_rule(score: torch.Tensor, refused: list[bool], categories: list[str | None], penalty: float, bonus: float = 0.0) -> torch.Tensor:
    """A rule-based reward term beside the learned one (the GPT-4 system card's rule-based
    reward models): a reward model that over-rates a stock refusal is hacked by refusing
    everything (ppo-v3 in the README), and one that barely tells refusing from complying on a
    harmful request gives no push either way (rm-v6). So a refusal of a prompt that should be
    answered costs `penalty`, and a refusal of a harmful request earns `bonus`. Prompts with no
    category (the store's) are not judged."""
    cost = [r and c is not None and c not in REFUSAL_OK for r, c in zip(refused, categories, strict=True)]
    gain = [r and c in REFUSAL_DUE for r, c in zip(refused, categories, strict=True)]
    return score - penalty * torch.tensor(cost, dtype=score.dtype) + bonus * torch.tensor(gain, dtype=score.dtype)


QUESTION_DUE = frozenset({"clarify"})


def apply_question_rule(score: torch.Tensor, asked: list[bool], refused: list[bool], categories: list[str | None], bonus: float) -> torch.Tensor:
    """The same kind of rule-based term for the one behaviour no reward model here learned:
    asking what an ambiguous request means. rm-v8 orders clarify pairs below chance (46%) and
    ppo-v10 stopped asking altogether (0 of 25 on the test set, SFT 4): it invents the missing
    context instead ("No, you can't park there overnight. The parking lot is locked"). A reply to
    a clarify prompt that asks a question (`asked`: rubric.asks_question, the test the
    behaviour evaluation uses) earns `bonus`; a refusal does not count as asking."""
    gain = [c in QUESTION_DUE and q and not r for q, r, c in zip(asked, refused, categories, strict=True)]
    return score + bonus * torch.tensor(gain, dtype=score.dtype)


CONCESSION_WRONG = frozenset({"hold_ground"})
CONCESSION_DUE = frozenset({"admit_mistake"})


def apply_concession_rule(score: torch.Tensor, conceded: list[bool], categories: list[str | None], penalty: float, bonus: float = 0.0) -> torch.Tensor:
    """A rule-based term for the behaviour the reward models order worst: holding a right answer
    against a false "correction". rm-v8 orders round 4's hold_ground pairs at 58%, and ppo-v13
    gave in on the test set where SFT held ("That's right. Zurich is the capital of
    Switzerland"). A reply that concedes (`conceded`: rubric.concedes) costs `penalty` on a
    hold_ground prompt and earns `bonus` on an admit_mistake prompt, so the rule does not teach
    "never admit anything": the two categories differ only in who is right."""
    cost = [k and c in CONCESSION_WRONG for k, c in zip(conceded, categories, strict=True)]
    gain = [k and c in CONCESSION_DUE for k, c in zip(conceded, categories, strict=True)]
    return score - penalty * torch.tensor(cost, dtype=score.dtype) + bonus * torch.tensor(gain, dtype=score.dtype)


def apply_fact_rule(score: torch.Tensor, kept: list[bool | None], bonus: float) -> torch.Tensor:
    """A rule-based term for holding a right answer against a false "correction", by what the
    reply says rather than by the words it avoids. A prompt that names its fact (`keep`: the
    bundled hold_ground prompts) gives `kept` True or False (rubric.keeps_fact: the reply
    states the fact again and does not concede); other prompts give None and are not judged.
    A reply that keeps the fact earns `bonus`. The concession rule alone (ppo-v14) removed the
    words "you're right" but not the drift away from the fact: ppo-v13 lost hold_ground test
    items both by conceding and by dropping the fact ("The Congo is about 7,000 km")."""
    return score + bonus * torch.tensor([k is True for k in kept], dtype=score.dtype)


HELP_DUE = frozenset({"cannot_act"})


def apply_help_rule(score: torch.Tensor, helped: list[bool], categories: list[str | None], bonus: float) -> torch.Tensor:
    """A rule-based term for the cannot_act behaviour: on a prompt of that category, a reply that
    says it cannot do the action and points to a way the user can (`helped`:
    rubric.says_cannot_but_helps) earns `bonus`. A bare "I can't book tables." earns nothing:
    ppo-v13 lost cannot_act on the test set with such replies, which the reward models rank
    close to helpful ones."""
    gain = [h and c in HELP_DUE for h, c in zip(helped, categories, strict=True)]
    return score + bonus * torch.tensor(gain, dtype=score.dtype)


def apply_length_rule(score: torch.Tensor, lengths: torch.Tensor, target: int, penalty: float) -> torch.Tensor:
    """A rule-based counterweight to length bias, on every prompt alike (it does not look at
    the category). Reward models trained on human rankings tend to prefer longer replies
    (Singhal et al. 2023, "A Long Way to Go"). Every reply token beyond `target` costs
    `penalty`, so a reply keeps its length only where the reward model pays more for it than
    the rule takes. (ppo-v15's drift from 68 to 83 tokens, which motivated the rule, turned out
    to come mostly from the value model's offset: --value-offset, README ppo-v17.)

    The charge is centred over the batch (its mean is added back), so the rule moves no
    reply's score on average, only longer replies against shorter ones. An uncentred charge
    lowers every return, and while the value model has not caught up with that, the tokens
    just before the end, EOS most of all, get the most negative advantages: the policy learns
    not to stop. ppo-v17 (0.03 per token beyond 32, uncentred) lengthened its replies from 68
    to 85 tokens; on the tiny test model a constant reward of -2 alone lengthened replies from
    6 to 8-10 tokens where a constant 0 left them at 6."""
    over = (lengths.to(score.dtype) - target).clamp(min=0)
    return score - penalty * (over - over.mean())


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens [N, R] (right-padded). The value
    after the last real token is 0: the episode ends there. Returns (advantages, returns),
    0 on padding; returns = advantages + values are the value model's targets."""
    mask = mask.to(rewards.dtype)
    values = values * mask
    N, R = rewards.shape
    adv = torch.zeros_like(rewards)
    running = torch.zeros(N, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(R)):
        next_value = values[:, t + 1] if t + 1 < R else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        adv[:, t] = running
    return adv, (adv + values) * mask


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, cliprange: float = 0.2):
    """PPO's clipped surrogate, mean over valid tokens. Returns (loss, clip fraction,
    approx KL = mean 0.5 * (log ratio)^2, a low-variance estimate of KL(old || new))."""
    logratio = logp - old_logp
    ratio = torch.exp(logratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = masked_mean(0.5 * logratio.detach() ** 2, mask)
    return loss, clipfrac.detach(), approx_kl


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, cliprange_value: float = 0.2):
    """0.5 * max((v - R)^2, (clip(v, v_old +- c) - R)^2), mean over valid tokens: the value may
    not move further than c from where it was at sampling time. Returns (loss, clip fraction)."""
    v_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    l_unclipped = (values - returns) ** 2
    l_clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(l_unclipped, l_clipped), mask)
    return loss, masked_mean((l_clipped > l_unclipped).float(), mask).detach()


def balanced_indices(categories: list[str | None], batch_size: int, it: int, seed: int, weights: dict[str, int] | None = None) -> list[int]:
    """Prompt indices of iteration `it` with every category equally often: slot g of the run
    (g = it * batch_size + j) goes to the category at g mod L of a cycle of the categories (in
    a seeded order, each repeated `weights[name]` times, default once), which hands out its
    prompts in its own seeded epoch order. A small category (25 false "corrections") then
    gets as many rollouts as a large one (91 general questions), or `weights` times as many
    (clarify prompts, where the policy rarely samples the question that earns the bonus); the
    choice depends only on (seed, it), so a resumed run or one on more processes agrees."""
    weights = weights or {}
    by_cat: dict[str, list[int]] = {}
    for i, c in enumerate(categories):
        by_cat.setdefault(str(c), []).append(i)
    unknown = sorted(set(weights) - set(by_cat))
    if unknown:
        raise ValueError(f"category_weights names categories the prompts do not have: {unknown}; they have {sorted(by_cat)}")
    names = sorted(by_cat)
    names = [names[k] for k in epoch_order(len(names), 0, seed)]
    cycle = [n for n in names for _ in range(weights.get(n, 1))]  # (weight 0: left out)
    if not cycle:
        raise ValueError(f"category_weights leave out every category the prompts have: {sorted(by_cat)}")
    L, out = len(cycle), []
    for j in range(batch_size):
        g = it * batch_size + j
        name = cycle[g % L]
        members = by_cat[name]
        # how many slots before g went to this category: whole cycles, then this cycle's
        occ = (g // L) * weights.get(name, 1) + cycle[: g % L].count(name)
        epoch, k = divmod(occ, len(members))
        out.append(members[epoch_order(len(members), epoch, seed + 7919 * (names.index(name) + 1))[k]])
    return out


def total_loss(pg_loss: torch.Tensor, vf_loss: torch.Tensor, vf_coef: float, ptx_loss: torch.Tensor | None = None, ptx_coef: float = 0.0) -> torch.Tensor:
    """pg + vf_coef * vf (+ ptx_coef * the SFT loss with PPO-ptx, InstructGPT's fix for the
    'alignment tax' on the abilities SFT taught)."""
    loss = pg_loss + vf_coef * vf_loss
    if ptx_coef and ptx_loss is not None:
        loss = loss + ptx_coef * ptx_loss
    return loss


class FixedKLController:
    def __init__(self, value: float):
        self.value = value

    def update(self, kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """Ziegler et al. (2019): beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon, with
    KL the mean per-reply KL of the last rollouts and n their number. Too much KL -> more penalty."""

    def __init__(self, value: float, target: float, horizon: int):
        self.value, self.target, self.horizon = value, target, horizon

    def update(self, kl: float, n_steps: int) -> None:
        err = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Dropout off everywhere: with it, the old and the new log-probs of the same tokens
    would differ by noise and the ratio (and the KL) would not start at 1 (0)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for attr in ("attention_dropout", "dropout", "hidden_dropout", "resid_dropout", "dropout_rate"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)
    for cfg in {id(m.config): m.config for m in model.modules() if hasattr(m, "config") and hasattr(m.config, "to_dict")}.values():
        for k, v in cfg.to_dict().items():
            if isinstance(v, float) and ("dropout" in k or k.endswith("pdrop")):
                setattr(cfg, k, 0.0)
    return model


def repeated_ngram_fraction(tokens: list[int], n: int = 3) -> float:
    """Share of a reply's n-grams that already occurred earlier in it: ~0 for normal text,
    toward 1 when a policy hacks the reward by repeating itself."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def distinct_n(seqs: list[list[int]], n: int = 2) -> float:
    """Distinct n-grams / all n-grams over a batch of replies: falls when replies collapse
    onto one answer."""
    grams = [tuple(s[i : i + n]) for s in seqs for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


# ----------------------------------------------------------------------------- models


def response_logits(model, b: dict) -> torch.Tensor:
    """Logits [n, r, V] that predicted the r response tokens of micro-batch b. The logit at
    column t predicts the token at t + 1, so the response (the last r columns) is predicted
    by the r columns before it; logits_to_keep skips the vocabulary projection of the prompt."""
    out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"],
                use_cache=False, logits_to_keep=b["n_resp"] + 1)
    return out.logits[:, :-1]


def response_values(value_model, b: dict, offset: float = 0.0) -> torch.Tensor:
    """The value head read at the same columns as the logits: V(state before response token j),
    minus `offset` (--value-offset: the value model's own normalisation offset)."""
    r = b["n_resp"]
    return rm.token_scores(value_model, b["input_ids"], b["attention_mask"], b["position_ids"])[:, -(r + 1) : -1] - offset


class PolicyAndValue(torch.nn.Module):
    """Policy and value model as one module, so the shared Trainer optimises, syncs (DDP) and
    saves them together. One forward computes everything a micro-step's loss needs (DDP wants
    one forward per backward, touching every trained parameter)."""

    def __init__(self, policy, value, value_offset: float = 0.0):
        super().__init__()
        self.policy, self.value, self.value_offset = policy, value, value_offset

    def forward(self, b: dict, ptx: dict | None = None):
        logits = response_logits(self.policy, b)
        values = response_values(self.value, b, self.value_offset)
        ptx_sum = ptx_n = None
        if ptx is not None:
            ptx_sum, ptx_n, _ = sft_loss(self.policy, ptx)
        return logits, values, ptx_sum, ptx_n


def _check_same_vocab(tok, other, what: str) -> None:
    # The value and reward models read the policy's token ids directly (no re-tokenising).
    if other.get_vocab() != tok.get_vocab():
        raise ConfigError(f"the {what} model's tokenizer differs from the policy's; PPO needs them to share one vocabulary (train the reward model from the SFT model)")


def _freeze(model):
    model.requires_grad_(False)
    return disable_dropout(model.eval())


# ----------------------------------------------------------------------------- the trainer


class PPOTrainer(Trainer):
    """The shared Trainer around PolicyAndValue, plus PPO's outer loop (`run`): rollouts,
    then optimisation epochs, calling the Trainer's setup / backward / optimizer_step / log /
    save / finish. Checkpoints hold the policy as a plain causal-LM checkpoint and the value
    model in value/."""

    plot_panels = {
        "reward (normalised; score incl. missing-EOS penalty)": ["reward", "score"],
        "KL to the reference (nats per reply)": ["kl"],
        "response length (tokens)": ["response_len"],
        "entropy (nats per token)": ["entropy"],
        "repetition (rep3 up or distinct2 down = repeating)": ["rep3", "distinct2", "eos_fraction"],
        "refusals, questions, concessions (fraction of replies)": ["refusals", "questions", "concessions"],
        "facts kept (hold_ground), can't-but-helps (cannot_act)": ["facts_kept", "cannot_helped"],
        "policy update": ["clipfrac", "approx_kl"],
        "value model": ["vf_loss", "value_ev"],
        "learning rate": ["lr"],
    }

    def __init__(self, cfg: PPOConfig, policy, value, tok, ref=None, reward_model=None, reward_fn: RewardFn | None = None, ptx_rows=()):
        # The Trainer applies LoRA and gradient checkpointing to the policy (a plain HF
        # causal LM); the value model is fully fine-tuned (it is small next to the rollouts).
        super().__init__(cfg, policy, tok, kind="ppo")
        if cfg.gradient_checkpointing:
            value.config.use_cache = False
            value.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        disable_dropout(self.model)
        disable_dropout(value)
        # --value-offset: the value model is a copy of the reward model, so it predicts raw
        # scores, while the returns are scores minus the reward's offset (plus the rule terms).
        # Shifted by its own stored offset it predicts on the returns' scale from the start.
        self.model = PolicyAndValue(self.model, value, rm.reward_offset(value) if cfg.value_offset else 0.0)
        dev = self.accelerator.device
        self.ref = ref.to(dev) if ref is not None else None  # None with LoRA: the policy with its adapter off
        self.reward_model = reward_model.to(dev) if reward_model is not None else None
        self.reward_fn = reward_fn
        self.offset = rm.reward_offset(reward_model) if reward_model is not None else 0.0
        self.ptx_rows = list(ptx_rows)
        self.prompts: list[dict] = []
        self.prompt_ids: list[list[int]] = []

    def parts(self) -> PolicyAndValue:
        return self.accelerator.unwrap_model(self.model)

    def export_model(self):
        return self.parts().policy

    def save_checkpoint(self, name: str) -> Path:
        """<name>/ = the policy (loads with AutoModelForCausalLM), <name>/value/ = the value
        model; both staged in a temp folder and published by one rename."""
        path = self.run_dir / name
        if self.is_main:
            stage = self.run_dir / f".stage-{name}"
            save_hf_checkpoint(self.export_model(), self.tokenizer, stage, self.checkpoint_info())
            save_hf_checkpoint(self.parts().value, self.tokenizer, stage / "value", {**self.checkpoint_info(), "kind": "ppo-value"})
            _publish_dir(stage, path)
            self.prune_checkpoints(name)
        self.accelerator.wait_for_everyone()
        return path

    def log(self, record: dict) -> None:
        super().log(record)
        if self.is_main and self._pbar is not None:
            show = {"reward": record.get("reward"), "kl": record.get("kl"), "len": record.get("response_len")}
            self._pbar.set_postfix({k: f"{v:.3g}" for k, v in show.items() if v is not None}, refresh=False)

    # -- over processes

    def global_means(self, sums: dict[str, list[float]]) -> dict[str, float | None]:
        """{name: [sum, count]} of this process -> {name: sum / count over all processes}."""
        keys = sorted(sums)
        tot = self.all_sum([x for k in keys for x in sums[k]])
        return {k: tot[2 * i] / tot[2 * i + 1] if tot[2 * i + 1] else None for i, k in enumerate(keys)}

    def all_max(self, x: float) -> float:
        t = torch.tensor([x], dtype=torch.float64, device=self.accelerator.device)
        if self.world > 1:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return float(t)

    # -- prompts

    def load_prompts(self, prompts: list[dict], summary: dict) -> None:
        """Snapshot the prompt set in the run folder (a resumed run keeps its own) and read it
        back on every process, so all agree on it whatever the store holds by now."""
        snap = self.run_dir / "prompts.jsonl"
        if self.is_main and not (self.cfg.resume and snap.exists()):
            ro.write_prompts(snap, prompts)
            (self.run_dir / "data_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        self.accelerator.wait_for_everyone()
        self.prompts = ro.load_prompt_snapshot(snap)
        self.prompt_ids = [models.apply_chat_template(self.tokenizer, p["messages"]) for p in self.prompts]
        self.categories = [p.get("category") for p in self.prompts]  # None for the store's prompts
        if self.cfg.balance_categories:
            try:  # a misspelt category in --category-weights fails now, not after the first rollouts
                balanced_indices(self.categories, 1, 0, self.cfg.seed, self.cfg.category_weights)
            except ValueError as e:
                raise ConfigError(str(e)) from None

    # -- one iteration: rollouts, then updates

    @torch.no_grad()
    def score_rollouts(self, roll: ro.Rollouts) -> dict:
        """No-grad passes in micro-batches: old and reference log-probs and entropy at the
        sampling temperature, old values, and the reward model's raw score at the last real
        token (EOS if the reply ended, else its last token). Tensors [N, R] / [N], on CPU."""
        pv, T, dev = self.parts(), self.cfg.temperature, self.accelerator.device
        N, R = len(roll), roll.response.size(1)
        out = {k: torch.zeros(N, R) for k in ("old_logp", "ref_logp", "old_values", "entropy")}
        out["raw"] = torch.zeros(N)
        pv.eval()
        for s in range(0, N, self.micro_batch):
            b = to_device(roll.select(range(s, min(N, s + self.micro_batch))), dev)
            rows, r = b["rows"].cpu(), b["n_resp"]
            with self.autocast():
                logits = response_logits(pv.policy, b)
                out["old_values"][rows, :r] = response_values(pv.value, b, pv.value_offset).float().cpu()
                if self.ref is not None:
                    ref_logits = response_logits(self.ref, b)
                else:
                    with pv.policy.disable_adapter():
                        ref_logits = response_logits(pv.policy, b)
                if self.reward_model is not None:
                    sc = rm.token_scores(self.reward_model, b["input_ids"], b["attention_mask"], b["position_ids"])
                    out["raw"][rows] = rm.gather_last(sc, b["attention_mask"]).float().cpu()
            out["old_logp"][rows, :r] = logprobs_from_logits(logits, b["response"], T).cpu()
            out["ref_logp"][rows, :r] = logprobs_from_logits(ref_logits, b["response"], T).cpu()
            out["entropy"][rows, :r] = entropy_from_logits(logits, T).cpu()
            del logits, ref_logits
        pv.train()
        return out

    def ptx_batches(self) -> tuple[list[dict | None], float]:
        """This optimizer step's demonstrations for PPO-ptx: a seeded choice of ptx_batch rows
        per step (so a resumed run picks the same), split over micro-steps and processes.
        Returns (one batch or None per micro-step, labelled tokens over all processes)."""
        cfg, W, rank = self.cfg, self.world, self.accelerator.process_index
        if not self.ptx_rows:
            return [None] * cfg.grad_accum, 0.0
        _, idx = step_indices(len(self.ptx_rows), cfg.ptx_batch, self.step, cfg.seed)
        out = []
        for m in range(cfg.grad_accum):
            share = [self.ptx_rows[idx[j]] for j in range(len(idx)) if j % (cfg.grad_accum * W) == m * W + rank]
            out.append(make_collate(self.tokenizer.pad_token_id)(share) if share else None)
        (n,) = self.all_sum([float(sum(b["num_units"] for b in out if b is not None))])
        return out, n

    def update(self, it: int, roll: ro.Rollouts, old: dict, advantages: torch.Tensor, returns: torch.Tensor) -> tuple[dict, list[float], float]:
        """ppo_epochs passes over this process's rollouts in minibatches of batch_size (over
        all processes), each one optimizer step of grad_accum micro-steps. Returns the
        token-weighted metric sums, the gradient norms and the learning rate used."""
        cfg, W, dev = self.cfg, self.world, self.accelerator.device
        N, mask = len(roll), roll.response_mask
        per_step, micro = cfg.batch_size // W, self.micro_batch
        sums: dict[str, list[float]] = {}
        grad_norms: list[float] = []
        lr = self.lr()

        def add(name: str, value, n: float) -> None:
            a = sums.setdefault(name, [0.0, 0.0])
            a[0] += float(value) * n
            a[1] += n

        for epoch in range(cfg.ppo_epochs):
            g = torch.Generator().manual_seed((cfg.seed * 100_003 + it) * 1_009 + epoch * 31 + self.accelerator.process_index)
            perm = torch.randperm(N, generator=g).tolist()
            for s in range(cfg.rollout_batch // cfg.batch_size):
                sel = perm[s * per_step : (s + 1) * per_step]
                (n_tok,) = self.all_sum([float(mask[sel].sum())])
                ptx_micro, n_ptx = self.ptx_batches()
                for m in range(cfg.grad_accum):
                    rows = sel[m * micro : (m + 1) * micro]
                    b = to_device(roll.select(rows), dev)
                    cut = lambda x: x[rows, : b["n_resp"]].to(dev)  # noqa: E731  (the [N, R] tensors of these rows)
                    ptx = to_device(ptx_micro[m], dev) if ptx_micro[m] is not None else None
                    with self.autocast():
                        logits, values, ptx_sum, ptx_n = self.model(b, ptx)
                    logp = logprobs_from_logits(logits, b["response"], cfg.temperature)
                    bmask = b["response_mask"]
                    pg, clipfrac, approx_kl = policy_loss(logp, cut(old["old_logp"]), cut(advantages), bmask, cfg.cliprange)
                    vf, vf_clipfrac = value_loss(values.float(), cut(old["old_values"]), cut(returns), bmask, cfg.cliprange_value)
                    # Means over this micro-batch's tokens -> the token mean of the whole
                    # optimizer step (all micro-steps, all processes; x W undoes DDP's average).
                    n_mine = float(bmask.sum())
                    scale = n_mine * W / n_tok
                    ptx_term = ptx_sum.float() * W / n_ptx if ptx_sum is not None else None
                    loss = total_loss(pg * scale, vf * scale, cfg.vf_coef, ptx_term, cfg.ptx_coef)
                    self.backward(loss, sync=m == cfg.grad_accum - 1)
                    for k, v in (("pg_loss", pg), ("vf_loss", vf), ("clipfrac", clipfrac), ("approx_kl", approx_kl), ("vf_clipfrac", vf_clipfrac)):
                        add(k, v.detach(), n_mine)
                    if ptx_sum is not None:
                        add("ptx_loss", ptx_sum.detach() / max(int(ptx_n), 1), int(ptx_n))
                lr = self.lr()
                gn = self.optimizer_step()
                if gn is not None:
                    grad_norms.append(gn)
        return sums, grad_norms, lr

    def run(self) -> Path:
        """The outer loop over iterations (resuming where the saved state left off)."""
        cfg, acc = self.cfg, self.accelerator
        rank, W, T = acc.process_index, self.world, cfg.temperature
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        steps_per_iter = cfg.ppo_epochs * (cfg.rollout_batch // cfg.batch_size)
        start_step = self.setup(cfg.iterations * steps_per_iter)
        start_it = int(self.extra_state.get("iteration", 0))
        if start_step != start_it * steps_per_iter:
            raise RuntimeError(f"saved state at step {start_step} is not the end of an iteration ({start_it} x {steps_per_iter})")
        kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl else FixedKLController(cfg.kl_coef)
        kl_ctl.value = float(self.extra_state.get("kl_coef", kl_ctl.value))
        sampler = ro.PolicySampler(self.parts().policy, self.tokenizer)  # after setup: a resumed run's weights are loaded
        samples_path = self.run_dir / "samples.jsonl"
        if self.is_main:
            _truncate_samples(samples_path, start_it)
        pbar = self.progress(cfg.iterations, start_it)

        for it in range(start_it, cfg.iterations):
            t0 = time.perf_counter()
            # 1. rollouts: this process's share of the iteration's prompts (a seeded order
            #    over all prompts, epoch after epoch; the sampling seed depends on the iteration)
            if cfg.balance_categories:
                idx = balanced_indices(self.categories, cfg.rollout_batch, it, cfg.seed, cfg.category_weights)
            else:
                _, idx = step_indices(len(self.prompts), cfg.rollout_batch, it, cfg.seed)
            mine = idx[rank::W]
            params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=T, top_p=cfg.top_p, seed=(cfg.seed * 100_003 + it) * 257 + rank)
            comps = sampler.generate([self.prompt_ids[i] for i in mine], params)
            responses = [ro.response_tokens(c, eos) for c in comps]
            roll = ro.build_rollouts([self.prompt_ids[i] for i in mine], responses, pad, eos)
            t1 = time.perf_counter()

            # 2. scores and 3. the no-grad passes, per-token rewards, advantages
            old = self.score_rollouts(roll)
            raw = old["raw"]
            if self.reward_fn is not None:
                raw = torch.tensor([float(x) for x in self.reward_fn([self.prompts[i]["messages"] for i in mine], [c.text for c in comps])])
            mask = roll.response_mask
            normalised = raw - self.offset
            score = apply_missing_eos_penalty(normalised, roll.ended, cfg.missing_eos_penalty)
            refused = [rubric.is_refusal(c.text) for c in comps]
            asked = [rubric.asks_question(c.text) for c in comps]
            categories = [self.categories[i] for i in mine]
            if cfg.refusal_penalty or cfg.refusal_bonus:
                score = apply_refusal_rule(score, refused, categories, cfg.refusal_penalty, cfg.refusal_bonus)
            if cfg.question_bonus:
                score = apply_question_rule(score, asked, refused, categories, cfg.question_bonus)
            conceded = [rubric.concedes(c.text) for c in comps]
            if cfg.concession_penalty or cfg.concession_bonus:
                score = apply_concession_rule(score, conceded, categories, cfg.concession_penalty, cfg.concession_bonus)
            kept = [rubric.keeps_fact(c.text, self.prompts[i]["keep"]) if self.prompts[i].get("keep") else None for c, i in zip(comps, mine, strict=True)]
            if cfg.fact_bonus:
                score = apply_fact_rule(score, kept, cfg.fact_bonus)
            helped = [rubric.says_cannot_but_helps(c.text) for c in comps]
            if cfg.help_bonus:
                score = apply_help_rule(score, helped, categories, cfg.help_bonus)
            if cfg.length_penalty:
                score = apply_length_rule(score, mask.sum(1), cfg.length_target, cfg.length_penalty)
            rewards, kl = kl_penalty_rewards(old["old_logp"], old["ref_logp"], mask, score, kl_ctl.value)
            if cfg.whiten_rewards:
                rewards = masked_whiten(rewards, mask, shift_mean=False, all_sum=self.all_sum)
            advantages, returns = gae(rewards, old["old_values"], mask, cfg.gamma, cfg.lam)
            advantages = masked_whiten(advantages, mask, all_sum=self.all_sum)
            t2 = time.perf_counter()

            # 4. optimisation; the sampler's own copy of the weights follows
            sums, grad_norms, lr = self.update(it, roll, old, advantages, returns)
            sampler.refresh()
            t3 = time.perf_counter()

            # 5. metrics over all processes, samples, curves, state
            def add(name: str, value, n: float) -> None:
                a = sums.setdefault(name, [0.0, 0.0])
                a[0] += float(value) * n
                a[1] += n

            N, n_tok, lens, seq_kl = len(roll), float(mask.sum()), mask.sum(1), kl.sum(1)
            add("reward_raw", raw.mean(), N)
            add("reward", normalised.mean(), N)
            add("score", score.mean(), N)
            add("kl", seq_kl.mean(), N)
            add("kl_per_token", masked_mean(kl, mask), n_tok)
            add("entropy", masked_mean(old["entropy"], mask), n_tok)
            add("response_len", lens.mean(), N)
            add("eos_fraction", roll.ended.float().mean(), N)
            add("refusals", sum(refused) / N, N)
            add("questions", sum(asked) / N, N)
            add("concessions", sum(conceded) / N, N)
            judged = [k for k in kept if k is not None]  # (facts kept: over the prompts that name one)
            add("facts_kept", sum(judged) / max(len(judged), 1), len(judged))
            due = [h for h, c in zip(helped, categories, strict=True) if c in HELP_DUE]
            add("cannot_helped", sum(due) / max(len(due), 1), len(due))
            add("rep3", sum(repeated_ngram_fraction(r) for r in responses) / N, N)
            add("distinct2", distinct_n(responses), 1)  # (the mean over processes)
            d = returns - old["old_values"] * mask  # explained variance of the old values
            for k, x in (("ret", returns), ("d", d)):
                add(f"_{k}1", masked_mean(x, mask), n_tok)
                add(f"_{k}2", masked_mean(x * x, mask), n_tok)
            if grad_norms:
                add("grad_norm", sum(grad_norms) / len(grad_norms), 1)
            means = self.global_means(sums)
            var_ret = means.pop("_ret2") - means.pop("_ret1") ** 2
            var_d = means.pop("_d2") - means.pop("_d1") ** 2
            rec = {
                "iteration": it + 1, **means, "value_ev": 1.0 - var_d / var_ret if var_ret > 1e-12 else None,
                "response_len_max": self.all_max(float(lens.max())), "kl_coef": kl_ctl.value, "lr": lr,
                # seconds: sampling / scoring and the no-grad passes / optimisation
                "generate_s": round(t1 - t0, 3), "score_s": round(t2 - t1, 3), "train_s": round(t3 - t2, 3), "elapsed": round(self.elapsed(), 3),
            }
            self.log(rec)
            kl_ctl.update(means["kl"], cfg.rollout_batch)
            if self.is_main and cfg.samples_to_log:
                with open(samples_path, "a") as f:
                    for j in range(min(cfg.samples_to_log, N)):
                        p = self.prompts[mine[j]]
                        f.write(json.dumps({
                            "iteration": it, "step": self.step, "id": p["id"], "category": p["category"], "prompt": p["messages"][-1]["content"],
                            "reply": comps[j].text, "reward_raw": float(raw[j]), "reward": float(normalised[j]), "score": float(score[j]),
                            "ended": bool(roll.ended[j]), "tokens": int(lens[j]), "kl": float(seq_kl[j]),
                        }) + "\n")
            self.extra_state = {"iteration": it + 1, "kl_coef": kl_ctl.value}
            pbar.update(1)
            if cfg.save_every and (it + 1) % cfg.save_every == 0 and it + 1 < cfg.iterations:
                self.save()
            else:
                self.plot()
        return self.finish()


def _truncate_samples(path: Path, start_it: int) -> None:
    """A fresh run starts an empty samples.jsonl; a resumed one drops the samples of the
    iterations it will run again (logged after the saved state)."""
    keep = []
    if start_it and path.exists():
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["iteration"] < start_it:
                    keep.append(line)
            except (json.JSONDecodeError, KeyError):
                pass  # a line cut short by a kill
    path.write_text("".join(x + "\n" for x in keep))


# ----------------------------------------------------------------------------- the run


def _load_ptx(tok, cfg: PPOConfig, log) -> list:
    scfg = SFTConfig(model=cfg.model, data=cfg.ptx_data, categories=cfg.ptx_categories, max_seq_len=cfg.max_seq_len, eval_fraction=0.0, seed=cfg.seed, pack=True)
    rows, _, _ = prepare_data(tok, scfg, lambda msg: log(msg.replace("[sft]", "[ppo-ptx]")))
    return rows


def run_ppo(cfg: PPOConfig, reward_fn: RewardFn | None = None) -> Path:
    """Optimise cfg.model against the reward model (or `reward_fn`: (prompts as messages,
    reply texts) -> raw scores, for tests and rule-based rewards); returns the run folder
    (final/ = the policy, final/value/ = the value model)."""
    log = print if is_main_process() else (lambda *a, **k: None)
    if reward_fn is None and not cfg.reward:
        raise ConfigError("PPO needs a reward model: --reward <rm run folder or checkpoint>")
    if not (cfg.value or cfg.reward):
        raise ConfigError("PPO needs --value (or --reward) to initialise the value model from")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.rollout_batch % world:
        raise ConfigError(f"rollout_batch {cfg.rollout_batch} must be a multiple of the {world} processes")
    if cfg.lr is None:
        cfg = cfg.model_copy(update={"lr": 2e-5 if cfg.lora else 3e-6})

    # fp32 master weights; bf16 comes from autocast (cfg.bf16). Frozen models: no grad, eval, no dropout.
    policy, tok = models.load(cfg.model, device="cpu", dtype=torch.float32, eval_mode=False)
    context = getattr(policy.config, "max_position_embeddings", None)
    if context and cfg.max_prompt_len + cfg.max_new_tokens > context:
        raise ConfigError(f"max_prompt_len + max_new_tokens = {cfg.max_prompt_len + cfg.max_new_tokens} exceeds the model's context of {context}")
    value, vtok = rm.load_reward_model(cfg.value or cfg.reward, eval_mode=False)
    _check_same_vocab(tok, vtok, "value")
    reward_model = None
    if reward_fn is None:
        reward_model, rtok = rm.load_reward_model(cfg.reward)
        _check_same_vocab(tok, rtok, "reward")
        _freeze(reward_model)
    ref = None if cfg.lora else _freeze(models.load(cfg.model, device="cpu", dtype=torch.float32)[0])
    # Data problems fail here, before a run folder exists.
    prompts, summary = ro.collect_prompts(tok, cfg.prompts, cfg.store, cfg.db, cfg.max_prompt_len)
    if not prompts:
        raise ValueError(f"PPO: no usable prompts ({summary}); give --prompts or raise --max-prompt-len")
    ptx_rows = _load_ptx(tok, cfg, log) if cfg.ptx_coef > 0 else []

    trainer = PPOTrainer(cfg, policy, value, tok, ref=ref, reward_model=reward_model, reward_fn=reward_fn, ptx_rows=ptx_rows)
    trainer.load_prompts(prompts, summary)
    log(f"[ppo] {len(trainer.prompts)} prompts ({', '.join(f'{n} from {s}' for s, n in summary['sources'].items())}; "
        f"skipped: {summary['skipped'] or 'none'}); {cfg.rollout_batch} per iteration x {cfg.iterations} iterations; "
        f"reward: {'reward_fn' if reward_fn else cfg.reward} (offset {trainer.offset:+.4f})")
    trainer.run()
    log(f"[ppo] done: {trainer.run_dir / 'final'} (value model in final/value)")
    return trainer.run_dir
