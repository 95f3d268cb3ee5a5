"""`loopchat eval winrate`: does the new model beat the old one, by the reward model, on
held-out prompts — and how far did it move?

For each held-out prompt (the bundled PPO prompts marked "heldout", never trained on) both
models reply (greedy by default); the reward model scores both replies; the win rate counts
a tie as half. Beside it, the drift that explains the win: KL(model || baseline) per reply,
estimated on replies sampled from the model at temperature 1 (sum over response tokens of
log p_model - log p_baseline), and reply length, distinct-2 and refusal share for both, so a win bought by
collapse (one stock answer, rambling, or refusing everything) is visible.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from pydantic import Field

from loopchat import models
from loopchat.config import Config
from loopchat.evaluate import rubric
from loopchat.evaluate.behaviours import label_of, replies_for
from loopchat.train import ppo, rollout
from loopchat.train import reward as R


class WinRateConfig(Config):
    model: str = Field(..., description="the new model (e.g. the PPO policy)")
    baseline: str = Field(..., description="the model it must beat (e.g. the SFT model)")
    reward: str = Field(..., description="reward model (rm run folder or checkpoint) that judges")
    prompts: list[str] = Field(default_factory=list, description="prompt files (default: the held-out split of the bundled PPO prompts)")
    out: str = Field("runs/eval", description="folder for winrate.json")
    max_new_tokens: int = Field(128, ge=1, description="reply budget in tokens")
    batch_size: int = Field(16, ge=1, description="prompts generated together")
    kl_samples: int = Field(1, ge=0, description="replies sampled per prompt (T = 1) to estimate the KL (0 = skip)")
    seed: int = Field(0, description="sampling seed for the KL estimate")


def reply_stats(tok, texts: list[str]) -> dict:
    """What a win can be bought with: length (rambling or one-liners), distinct-2 (one stock
    answer) and the share of refusals (a reward model that over-rates "I can't help with
    that." is hacked by refusing everything; seen here with a reward model trained 0.7 epochs)."""
    toks = [tok.encode(t, add_special_tokens=False) for t in texts]
    n = max(len(texts), 1)
    return {"mean_tokens": sum(map(len, toks)) / n, "distinct2": ppo.distinct_n(toks, 2),
            "refusal_rate": sum(rubric.is_refusal(t) for t in texts) / n}


def heldout_prompts(files: list[str]) -> list[dict]:
    paths = rollout.prompt_files(files)
    items = [p for f in paths for p in rollout.read_prompts(f)]
    if not files:
        items = [p for p in items if p.get("split") == "heldout"]
    if not items:
        raise ValueError(f"eval winrate: no prompts in {', '.join(map(str, paths))}")
    return items


@torch.no_grad()
def kl_to(model, baseline, tok, prompts: list[list[dict]], max_new_tokens: int, seed: int, batch: int = 8) -> list[float]:
    """Per-reply KL(model || baseline) estimated on the model's own samples at T = 1."""
    from loopchat.generate import Generator, SamplingParams

    gen = Generator(model, tok)
    out = []
    for s in range(0, len(prompts), batch):
        chunk = prompts[s : s + batch]
        p_ids = [models.apply_chat_template(tok, p) for p in chunk]
        comps = gen.generate(p_ids, SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, seed=seed + s))
        resp = [rollout.response_tokens(c[0], tok.eos_token_id) or [tok.eos_token_id] for c in comps]
        roll = rollout.build_rollouts(p_ids, resp, tok.pad_token_id, tok.eos_token_id)
        b = roll.select(range(len(roll)))
        lp = ppo.logprobs_from_logits(ppo.response_logits(model, b), b["response"])
        lq = ppo.logprobs_from_logits(ppo.response_logits(baseline, b), b["response"])
        out += ((lp - lq) * b["response_mask"]).sum(1).tolist()
    return out


def run_winrate(cfg: WinRateConfig) -> dict:
    items = heldout_prompts(cfg.prompts)
    msgs = [{"messages": p["messages"]} for p in items]
    replies = {}
    for which, spec in (("model", cfg.model), ("baseline", cfg.baseline)):
        replies[which] = replies_for(spec, msgs, cfg.max_new_tokens, cfg.batch_size)
    rmodel, rtok = R.load_reward_model(cfg.reward)
    prompts = [p["messages"] for p in items]
    scores = {w: R.score_replies(rmodel, rtok, prompts, replies[w]) for w in replies}
    del rmodel
    kls = []
    if cfg.kl_samples:
        m, tok = models.load(cfg.model)
        b, _ = models.load(cfg.baseline)
        for k in range(cfg.kl_samples):
            kls += kl_to(m, b, tok, prompts, cfg.max_new_tokens, cfg.seed + 1000 * k)
    by_cat = defaultdict(list)
    rows = []
    for i, p in enumerate(items):
        a, b_ = scores["model"][i], scores["baseline"][i]
        win = 1.0 if a > b_ else 0.5 if a == b_ else 0.0
        by_cat[p["category"]].append(win)
        by_cat["ALL"].append(win)
        rows.append({"id": p["id"], "category": p["category"], "prompt": p["messages"][-1]["content"], "model_reply": replies["model"][i],
                     "baseline_reply": replies["baseline"][i], "model_reward": a, "baseline_reward": b_, "win": win})

    result = {
        "model": cfg.model, "baseline": cfg.baseline, "reward": cfg.reward, "prompts": len(items),
        "win_rate": {c: sum(v) / len(v) for c, v in sorted(by_cat.items())}, "pairs": {c: len(v) for c, v in sorted(by_cat.items())},
        "mean_reward": {w: sum(s) / len(s) for w, s in scores.items()},
        "kl_per_reply": sum(kls) / len(kls) if kls else None,
        "model_stats": reply_stats(rtok, replies["model"]), "baseline_stats": reply_stats(rtok, replies["baseline"]), "rows": rows,
    }
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "winrate.json"
    path.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    a, b = label_of(cfg.model), label_of(cfg.baseline)
    print(f"{a} vs {b}, judged by {label_of(cfg.reward)} on {len(items)} held-out prompts")
    print(f"{'category':<18}{'prompts':>8}{'win rate':>10}")
    for c, v in result["win_rate"].items():
        print(f"{c:<18}{result['pairs'][c]:>8}{100 * v:>9.1f}%")
    print(f"mean reward {result['mean_reward']['model']:+.3f} vs {result['mean_reward']['baseline']:+.3f}; "
          + (f"KL({a} || {b}) {result['kl_per_reply']:.2f} nats per reply; " if kls else "")
          + f"tokens {result['model_stats']['mean_tokens']:.0f} vs {result['baseline_stats']['mean_tokens']:.0f}; "
          f"distinct-2 {result['model_stats']['distinct2']:.2f} vs {result['baseline_stats']['distinct2']:.2f}; "
          f"refusals {100 * result['model_stats']['refusal_rate']:.0f}% vs {100 * result['baseline_stats']['refusal_rate']:.0f}%")
    print(f"wrote {path}")
    return result
