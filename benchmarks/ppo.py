"""PPO iteration speed: where one iteration of loopchat's PPO spends its time.

    python benchmarks/ppo.py                          # CPU, the embedded SmolLM2-135M(-Instruct), 2 threads, full fine-tuning
    python benchmarks/ppo.py --variants full,lora     # also the LoRA policy (about twice as long in all)
    python benchmarks/ppo.py --reward runs/rm-...     # reward AND value model from a trained reward model
    python benchmarks/ppo.py --tiny --quick           # smoke run: a tiny random Llama, 1 warm-up + 1 timed iteration
    python benchmarks/ppo.py --device cuda            # GPU (run on one H200): a random ~1B Llama-3.2-1B-shaped model, samples/s

What runs: loopchat.train.ppo.run_ppo itself, with a PPOConfig, into a temporary run folder
(deleted afterwards), each variant in its own subprocess so its peak RSS / peak CUDA memory is
its own. Nothing in the algorithm is changed; the child only wraps a few functions with timers:

  generate   the iteration's `generate_s` (PolicySampler: loopchat.generate's batched sampler --
             the bf16 fast decoder on CPU, transformers' forward with a KV cache on GPU -- plus
             laying out the rollouts). Also: tokens sampled (incl. EOS) / generate_s.
  score      the iteration's `score_s`, split by wrapping what PPOTrainer.score_rollouts calls:
               policy     response_logits(policy): the old log-probs' forward pass
               reference  response_logits(reference) (with --lora: the policy, adapter off)
               value      response_values(value model): the old values
               reward     token_scores(reward model): the raw score
               other      the rest: three float32 log-softmaxes over the vocabulary (old and
                          reference log-probs, entropy), copies to CPU, KL-penalised rewards,
                          GAE, advantage whitening
  train      the iteration's `train_s`, split by wrapping the Trainer's backward and
             optimizer_step and the sampler's refresh:
               forward    train_s minus the three below: micro-batch layout, the policy +
                          value forward (PolicyAndValue), log-probs, clipped losses
               backward   Trainer.backward
               optimizer  Trainer.optimizer_step: gradient clipping, AdamW, scheduler, zero_grad
               refresh    PolicySampler.refresh: the fast decoder's bf16 weight copy (--lora:
                          a deep copy of the policy, merged)
  bookkeeping  iteration wall time minus the three phases, split into curves.png (redrawn every
             iteration) and the rest (the metrics line, samples.jsonl, the KL controller).

An iteration's wall time runs from the sampler call to the end of its curves.png (the last
thing run() does in an iteration with save_every = 0; the one-time matplotlib import lands in
the warm-up iteration). Per variant the tables give the mean over the timed iterations: seconds per phase and its share, samples/s = rollouts per iteration / wall
seconds per iteration, tokens sampled per second of the generate phase, peak memory.
What is skipped: the final checkpoint + resumable state that run_ppo writes at the end
(PPOTrainer.finish is replaced; save_every = 0, so no checkpoint is written mid-run).

Held equal between the variants (full, lora): the model, reward and value checkpoints, the
prompts (the bundled set; --store off, so the results do not depend on the local store), the
seeds (prompt order and sampling seeds per iteration), rollout_batch, max_new_tokens,
batch_size, grad_accum, ppo_epochs, bf16 autocast, torch threads. Only PPOConfig.lora differs
(and with it run_ppo's default lr: 3e-6 full, 2e-5 LoRA; the reference is the policy with its
adapter off, so no separate reference copy). Sampled reply lengths can differ between variants
after the warm-up iteration (the policies move differently), and every forward / backward
cost scales with them: the table shows the mean reply length per variant.

Defaults (CPU): policy = reference = the embedded model ("default"), reward and value =
load_reward_model("default") (the same checkpoint with a fresh zero score head: every reward
is 0, which is fine for timing) unless --reward is given; rollout_batch 32, max_new_tokens 96,
batch_size 16, grad_accum 4 (PPOConfig's defaults), ppo_epochs 2, 1 warm-up + 3 timed
iterations, 2 threads.

Estimated duration of the default run on 2 quiet cores (from the code and the numbers in
docs/benchmarks.md, not measured): per iteration about 10 s generating (32 x <= 96 tokens at
~350-450 tok/s batched), 25 s scoring (four forward passes over ~32 x 180 tokens, at about
3x the 283 tok/s forward+backward rate of SFT), 60-80 s training (2 epochs x 32 rollouts
through policy + value, forward + backward, 8 AdamW steps) and ~1 s bookkeeping: ~100-120 s.
Four iterations + start-up: ~7-8 minutes for `full`; `--variants full,lora` ~13-15 minutes.
A shared machine can be 2-5x slower.

--device cuda (run on one H200 on 2026-12-04: docs/benchmarks.md). The policy is a Llama-3.2-1B-shaped model
(d 2048, 16 layers, 32 heads / 8 KV heads, MLP 8192, tied embeddings; 1.07B parameters with
the embedded tokenizer's 49k vocabulary) with random weights, written once as a bf16
checkpoint in a temp folder and loaded by run_ppo as always: fp32 master weights, bf16
autocast for scoring and training. Generation on GPU goes through loopchat.generate's
transformers backend, which runs the fp32 weights WITHOUT autocast (that is what run_ppo does
on a GPU today). Random weights almost never sample EOS, so every reply is max_new_tokens long:
a worst case for length. Defaults: rollout_batch 128, max_new_tokens 256, batch_size 32,
grad_accum 2 (micro-batches of 16), ppo_epochs 2. Reported: samples/s, the phase split, peak
CUDA memory.

On paper vs OpenRLHF (printed with the results; nothing of OpenRLHF is run here):
  - OpenRLHF's README (https://github.com/OpenRLHF/OpenRLHF) states that RLHF training "spends
    80% of the time on the sample generation stage" (its setting: multi-GPU, 7B-70B models,
    long generations, vLLM); compare that with the generate share measured here.
  - The same README claims "2x+" the performance of an optimized DeepSpeed-Chat with Hybrid
    Engine: a relative figure, not comparable with the absolute samples/s here.
  - OpenRLHF's technical report (arXiv:2405.11143) times one PPO epoch over 1024 prompts on
    A800 GPUs against DeepSpeed-Chat with its Hybrid Engine: for Llama-2 7B on 16 GPUs,
    471 s (DeepSpeed-Chat 855 s), i.e. 1024 / 471 = 2.17 samples/s, 0.136 samples/s per
    GPU. Read from the report's table as reproduced in public write-ups; its generation
    length and batch layout differ from ours (not verified here), and 7B is ~6.5x the 1.07B
    model of --device cuda: a comparison of orders of magnitude, printed with the result.

Prints markdown tables and writes benchmarks/results/ppo-<device>[-tiny].json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from harness import environment_line, eprint, in_subprocess, make_model, peak_mem, sync, versions  # noqa: E402

HERE = Path(__file__).resolve().parent
ALL_VARIANTS = ["full", "lora"]
TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=2048)
LLAMA_1B_SHAPE = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                      max_position_embeddings=4096)

# the phase rows of the breakdown table: (key in the per-iteration dict, label)
PHASES = [
    ("generate_s", "generate (sampling + rollout layout)"),
    ("score_policy_s", "score: policy forward (old log-probs)"),
    ("score_ref_s", "score: reference forward"),
    ("score_value_s", "score: value forward"),
    ("score_reward_s", "score: reward forward"),
    ("score_other_s", "score: other (3 log-softmaxes, GAE, whitening)"),
    ("train_fwd_s", "train: forward + losses"),
    ("train_backward_s", "train: backward"),
    ("train_optim_s", "train: clip + AdamW step"),
    ("train_refresh_s", "train: sampler weight refresh"),
    ("plot_s", "bookkeeping: curves.png"),
    ("bookkeeping_other_s", "bookkeeping: metrics line, samples.jsonl"),
]
COARSE = [("generate_s", "generate"), ("score_s", "score"), ("train_s", "train"), ("bookkeeping_s", "bookkeeping")]

OPENRLHF_README = "https://github.com/OpenRLHF/OpenRLHF"
OPENRLHF_7B_SPS = 1024 / 471.11  # the report's 7B / 16 x A800 row: 1024 prompts, one PPO epoch, 471.11 s


# ----------------------------------------------------------------------------- the child: one variant


def child(variant: str, a: dict) -> dict:
    """run_ppo with timers around the pieces of an iteration (see the module docstring)."""
    import torch

    torch.set_num_threads(a["threads"])
    from loopchat.train import loop, ppo
    from loopchat.train import reward as rm
    from loopchat.train import rollout as ro

    dev = a["device"]
    parts: dict[str, float] = defaultdict(float)  # seconds of this iteration's wrapped pieces
    counts = {"gen_tokens": 0, "prompt_tokens": 0, "rollouts": 0}
    iters: list[dict] = []  # one per metrics line
    st = {"trainer": None, "phase": None, "n_logits": 0, "autocast": {}}

    def timed(key, fn, *args, **kw):
        sync(dev)
        t = time.perf_counter()
        try:
            return fn(*args, **kw)
        finally:
            sync(dev)
            parts[key] += time.perf_counter() - t

    # -- scoring: which model a response_logits / token_scores call is for
    orig_logits, orig_values, orig_scores = ppo.response_logits, ppo.response_values, rm.token_scores
    orig_score_rollouts, orig_update = ppo.PPOTrainer.score_rollouts, ppo.PPOTrainer.update

    def response_logits(model, b):
        if st["phase"] not in st["autocast"]:
            st["autocast"][st["phase"]] = torch.is_autocast_enabled(dev)
        if st["phase"] != "score":
            return orig_logits(model, b)
        tr = st["trainer"]
        if tr.ref is not None:
            key = "ref" if model is tr.ref else "policy"
        else:  # LoRA: score_rollouts calls the policy, then the policy with its adapter off, per micro-batch
            key = "policy" if st["n_logits"] % 2 == 0 else "ref"
            st["n_logits"] += 1
        return timed(f"score_{key}", orig_logits, model, b)

    def response_values(value_model, b):
        if st["phase"] != "score":
            return orig_values(value_model, b)
        return timed("score_value", orig_values, value_model, b)

    def token_scores(model, *args, **kw):
        tr = st["trainer"]
        if st["phase"] == "score" and tr is not None and model is tr.reward_model:
            return timed("score_reward", orig_scores, model, *args, **kw)
        return orig_scores(model, *args, **kw)  # (the value model's call inside response_values)

    def score_rollouts(self, roll):
        st.update(trainer=self, phase="score", n_logits=0)
        try:
            return orig_score_rollouts(self, roll)
        finally:
            st["phase"] = None

    def update(self, *args, **kw):
        st["phase"] = "train"
        try:
            return orig_update(self, *args, **kw)
        finally:
            st["phase"] = None

    # -- training and sampling
    orig_generate, orig_refresh = ro.PolicySampler.generate, ro.PolicySampler.refresh

    def generate(self, prompt_ids, params):
        st["backend"] = self.gen.backend
        st["t_start"] = time.perf_counter()  # (run() does only step_indices before this in an iteration)
        comps = orig_generate(self, prompt_ids, params)
        counts["gen_tokens"] += sum(len(c.token_ids) + (c.finish_reason == "stop") for c in comps)  # EOS is sampled too
        counts["prompt_tokens"] += sum(len(p) for p in prompt_ids)
        counts["rollouts"] += len(comps)
        return comps

    def refresh(self):
        return timed("train_refresh", orig_refresh, self)

    def backward(self, loss, sync=True):
        return timed("train_backward", loop.Trainer.backward, self, loss, sync)

    def optimizer_step(self):
        return timed("train_optim", loop.Trainer.optimizer_step, self)

    # -- one record per iteration; no final save
    orig_log = ppo.PPOTrainer.log

    def log(self, record):
        iters.append({"t_start": st["t_start"], "record": dict(record), "parts": dict(parts), **counts})
        parts.clear()
        counts.update(gen_tokens=0, prompt_tokens=0, rollouts=0)
        return orig_log(self, record)

    orig_plot = ppo.PPOTrainer.plot

    def plot(self):  # the last thing of every iteration (save_every = 0): its end
        t = time.perf_counter()
        orig_plot(self)
        iters[-1]["t_end"] = time.perf_counter()
        iters[-1]["plot_s"] = iters[-1]["t_end"] - t

    def finish(self):
        if self._pbar is not None:
            self._pbar.close()
        return self.run_dir / "final"

    ppo.response_logits, ppo.response_values, rm.token_scores = response_logits, response_values, token_scores
    ppo.PPOTrainer.score_rollouts, ppo.PPOTrainer.update = score_rollouts, update
    ppo.PPOTrainer.backward, ppo.PPOTrainer.optimizer_step = backward, optimizer_step
    ppo.PPOTrainer.log, ppo.PPOTrainer.plot, ppo.PPOTrainer.finish = log, plot, finish
    ro.PolicySampler.generate, ro.PolicySampler.refresh = generate, refresh

    tmp = Path(tempfile.mkdtemp(prefix=f"bench-ppo-{variant}-"))
    n_iter = a["warmup"] + a["iterations"]
    cfg = ppo.PPOConfig(
        model=a["model"], reward=a["reward"], prompts=[], store=False, out=str(tmp / "run"), iterations=n_iter,
        rollout_batch=a["rollout_batch"], batch_size=a["batch_size"], grad_accum=a["grad_accum"], ppo_epochs=a["ppo_epochs"],
        max_new_tokens=a["max_new_tokens"], max_prompt_len=a["max_prompt_len"], save_every=0, lora=variant == "lora",
        bf16=a["bf16"], seed=a["seed"],
    )
    t0 = time.perf_counter()
    try:
        ppo.run_ppo(cfg)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    total_s = time.perf_counter() - t0
    if len(iters) != n_iter:
        raise RuntimeError(f"expected {n_iter} metrics lines, got {len(iters)}")

    per_iter = []
    for i in range(a["warmup"], n_iter):
        it, p, rec = iters[i], iters[i]["parts"], iters[i]["record"]
        wall = it["t_end"] - it["t_start"]
        g, s, tr = rec["generate_s"], rec["score_s"], rec["train_s"]
        score_parts = {k: p.get(k, 0.0) for k in ("score_policy", "score_ref", "score_value", "score_reward")}
        train_known = p.get("train_backward", 0.0) + p.get("train_optim", 0.0) + p.get("train_refresh", 0.0)
        per_iter.append({
            "iteration": rec["iteration"], "wall_s": wall, "generate_s": g, "score_s": s, "train_s": tr,
            **{f"{k}_s": v for k, v in score_parts.items()}, "score_other_s": s - sum(score_parts.values()),
            "train_fwd_s": tr - train_known, "train_backward_s": p.get("train_backward", 0.0),
            "train_optim_s": p.get("train_optim", 0.0), "train_refresh_s": p.get("train_refresh", 0.0),
            "bookkeeping_s": wall - (g + s + tr), "plot_s": it["plot_s"], "bookkeeping_other_s": wall - (g + s + tr) - it["plot_s"],
            "rollouts": it["rollouts"], "gen_tokens": it["gen_tokens"], "prompt_tokens": it["prompt_tokens"],
            "response_len": rec.get("response_len"), "eos_fraction": rec.get("eos_fraction"), "kl": rec.get("kl"),
        })
    n = len(per_iter)
    mean = {k: sum(r[k] for r in per_iter) / n for k in per_iter[0] if k != "iteration" and per_iter[0][k] is not None}
    tr = st["trainer"]
    model = tr.model
    trainable = sum(q.numel() for q in model.parameters() if q.requires_grad)
    pv = tr.parts()
    return {
        "variant": variant, "device": dev, "threads": a["threads"], "iterations": per_iter, "mean": mean,
        "samples_per_s": a["rollout_batch"] / mean["wall_s"],
        "gen_tokens_per_s": sum(r["gen_tokens"] for r in per_iter) / sum(r["generate_s"] for r in per_iter),
        "wall_s_min": min(r["wall_s"] for r in per_iter), "wall_s_max": max(r["wall_s"] for r in per_iter),
        "warmup_wall_s": iters[a["warmup"] - 1]["t_end"] - t0 if a["warmup"] else None,
        "run_seconds": total_s, "peak_mem_mib": peak_mem(dev), "trainable_params": trainable,
        "policy_params": sum(q.numel() for q in pv.policy.parameters()), "value_params": sum(q.numel() for q in pv.value.parameters()),
        "sampler_backend": st.get("backend"),
        "autocast": {str(k): v for k, v in st["autocast"].items()},
        "lr": cfg.lr if cfg.lr is not None else (2e-5 if cfg.lora else 3e-6),
    }


# ----------------------------------------------------------------------------- the parent


def fmt_params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def on_paper(ok: list[dict], cuda: bool) -> list[str]:
    """The comparison with OpenRLHF's published claims: only what its README states; the rest a
    marked placeholder (see the module docstring)."""
    shares = ", ".join(f"{r['variant']} {100 * r['mean']['generate_s'] / r['mean']['wall_s']:.0f}%" for r in ok)
    lines = [
        "On paper vs OpenRLHF (nothing of OpenRLHF was run):",
        f"- OpenRLHF's README ({OPENRLHF_README}) states that RLHF training spends 80% of the time on sample generation "
        f"(multi-GPU, 7B-70B models, long generations, vLLM). Generation share here: {shares or '-'}.",
        "- The same README claims 2x+ the performance of an optimized DeepSpeed-Chat with Hybrid Engine: a relative "
        "figure, not comparable with absolute samples/s.",
        "- OpenRLHF's technical report (arXiv:2405.11143): one PPO epoch over 1024 prompts, Llama-2 7B on 16 A800s, 471 s "
        f"= {OPENRLHF_7B_SPS:.2f} samples/s ({OPENRLHF_7B_SPS / 16:.3f} per GPU; DeepSpeed-Chat Hybrid Engine 855 s). Here: "
        + (", ".join(f"{r['variant']} {r['samples_per_s']:.2f} samples/s on 1 GPU" for r in ok) + " for a 1.07B model (7B is ~6.5x "
           "the parameters; generation lengths differ, see the module docstring)." if cuda
           else "a --device cuda run is the comparable one (a 2-core CPU run is not)."),
    ]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--model", default="default", help="policy = reference checkpoint (CPU; --tiny and CUDA use random models)")
    ap.add_argument("--reward", help="reward model (and value init): a `train rm` run folder or checkpoint "
                    "(default: the --model checkpoint with a fresh zero score head)")
    ap.add_argument("--tokenizer", help="folder with the embedded model's tokenizer, for the random models (--tiny, CUDA) on a "
                    "machine without the embedded model (default: the embedded model's)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random Llama (2 layers, d=64) with the real tokenizer (smoke runs)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 warm-up + 1 timed iteration, 4 rollouts x 8 tokens, "
                    "batch 2, 1 epoch")
    ap.add_argument("--variants", default="full", help="comma-separated, of: full, lora (default: full)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed iterations first (default 1)")
    ap.add_argument("--iterations", type=int, help="timed iterations (default 3, quick 1)")
    ap.add_argument("--rollout-batch", type=int, help="rollouts per iteration (default 32 CPU, 128 CUDA, 4 quick)")
    ap.add_argument("--max-new-tokens", type=int, help="longest reply (default 96 CPU, 256 CUDA, 8 quick)")
    ap.add_argument("--batch-size", type=int, help="rollouts per optimizer step (default 16 CPU, 32 CUDA, 2 quick)")
    ap.add_argument("--grad-accum", type=int, help="micro-steps per optimizer step (default 4 CPU, 2 CUDA, 1 quick)")
    ap.add_argument("--ppo-epochs", type=int, help="optimisation passes per iteration (default 2, quick 1)")
    ap.add_argument("--max-prompt-len", type=int, default=256, help="skip longer prompts (PPOConfig's default 256)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "2")), help="torch threads (default 2)")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/ppo-<device>.json; --tiny: ppo-<device>-tiny.json)")
    ap.add_argument("--child", nargs=2, metavar=("VARIANT", "ARGS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        variant, a = args.child
        print(json.dumps(child(variant, json.loads(a))))
        return

    cpu, q = args.device == "cpu", args.quick
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or any(v not in ALL_VARIANTS for v in variants):
        ap.error(f"--variants: comma-separated names from {ALL_VARIANTS}, got {args.variants!r}")
    from loopchat.models import native_bf16

    # bf16 autocast for every variant where the hardware runs it natively (emulated bf16 is >10x slower)
    a = {
        "device": args.device, "bf16": native_bf16(args.device), "model": args.model, "reward": args.reward or args.model, "threads": args.threads, "seed": 0,
        "warmup": args.warmup, "iterations": args.iterations or (1 if q else 3),
        "rollout_batch": args.rollout_batch or (4 if q else 32 if cpu else 128),
        "max_new_tokens": args.max_new_tokens or (8 if q else 96 if cpu else 256),
        "batch_size": args.batch_size or (2 if q else 16 if cpu else 32),
        "grad_accum": args.grad_accum or (1 if q else 4 if cpu else 2),
        "ppo_epochs": args.ppo_epochs or (1 if q else 2),
        "max_prompt_len": args.max_prompt_len,
    }
    if a["warmup"] < 0:
        ap.error("--warmup must be >= 0")
    if a["iterations"] < 1:
        ap.error("--iterations must be >= 1")
    if a["rollout_batch"] % a["batch_size"] or a["batch_size"] % a["grad_accum"]:
        ap.error("--rollout-batch must be a multiple of --batch-size, and --batch-size of --grad-accum")
    if (args.tiny or not cpu) and (args.reward or args.model != "default"):
        ap.error("--model / --reward apply to CPU runs without --tiny (the others use random models)")

    tmp = Path(tempfile.mkdtemp(prefix="bench-ppo-"))
    rows = []
    try:
        if args.tiny:
            a["model"] = a["reward"] = make_model(tmp / "tiny", TINY_SHAPE, bf16=False, tokenizer=args.tokenizer)
            label = "tiny random Llama (2 layers, d=64)"
        elif not cpu:  # --- CUDA path (run on one H200, 2026-12-04) ---
            eprint("writing a random Llama-3.2-1B-shaped checkpoint (bf16) ...")
            a["model"] = a["reward"] = make_model(tmp / "llama-1b", LLAMA_1B_SHAPE, bf16=True, tokenizer=args.tokenizer)
            label = "random Llama-3.2-1B-shaped, 1.07B params"
        else:
            label = a["model"]
        reward_label = ("fresh zero score head on the policy checkpoint" if a["reward"] == a["model"] else a["reward"])
        a["model_label"], a["reward_label"] = label, reward_label
        eprint(f"model: {label}; reward/value: {reward_label}; {a['warmup']} warm-up + {a['iterations']} timed iterations; "
               f"{a['rollout_batch']} rollouts x <= {a['max_new_tokens']} tokens; batch {a['batch_size']} in {a['grad_accum']} "
               f"micro-steps; {a['ppo_epochs']} epochs; {a['threads']} threads; variants {', '.join(variants)}")
        for v in variants:
            t0 = time.perf_counter()
            r = in_subprocess(__file__, v, a)
            rows.append(r)
            if not r.get("failed"):
                eprint(f"  {v:5s} {r['mean']['wall_s']:8.2f} s/iteration  {r['samples_per_s']:7.3f} samples/s  "
                       f"({time.perf_counter() - t0:.0f} s incl. load)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    env = versions(trl=False)
    print(f"\n{environment_line(cpu, a['threads'], env)}")
    print(f"policy/reference: {label}; reward/value: {reward_label}; prompts: bundled; {a['rollout_batch']} rollouts/iteration, "
          f"max_new_tokens {a['max_new_tokens']}, batch {a['batch_size']} x {a['grad_accum']} micro-steps, {a['ppo_epochs']} PPO epochs, "
          f"bf16 autocast; mean of {a['iterations']} timed iterations after {a['warmup']} warm-up\n")
    ok = [r for r in rows if not r.get("failed")]
    mem = "peak MiB" + (" (CUDA)" if not cpu else " (RSS)")
    print(f"| variant | trainable | s/iteration (min-max) | samples/s | sampled tok/s | reply tokens | prompt tokens | EOS | {mem} |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("failed"):
            print(f"| {r['variant']} | failed: {r['error'].splitlines()[-1][:120] if r['error'] else '?'} |")
            continue
        m = r["mean"]
        print(f"| {r['variant']} | {fmt_params(r['trainable_params'])} | {m['wall_s']:.2f} ({r['wall_s_min']:.2f}-{r['wall_s_max']:.2f}) | "
              f"{r['samples_per_s']:.3f} | {r['gen_tokens_per_s']:.1f} | {m['gen_tokens'] / max(1, m['rollouts']):.1f} | "
              f"{m['prompt_tokens'] / max(1, m['rollouts']):.1f} | {100 * (m.get('eos_fraction') or 0):.0f}% | {r['peak_mem_mib']:.0f} |")
    if ok:
        print("\nSeconds per iteration by phase (share of the iteration's wall time):\n")
        print("| phase | " + " | ".join(r["variant"] for r in ok) + " |")
        print("|---|" + "---|" * len(ok))
        for rows_ in (COARSE, PHASES):
            for key, name in rows_:
                cells = [f"{r['mean'][key]:.2f} s ({100 * r['mean'][key] / r['mean']['wall_s']:.0f}%)" for r in ok]
                print(f"| {name if rows_ is PHASES else '**' + name + '**'} | " + " | ".join(cells) + " |")
            if rows_ is COARSE:
                print("| **iteration (wall)** | " + " | ".join(f"{r['mean']['wall_s']:.2f} s" for r in ok) + " |")
        print()
        for r in ok:
            print(f"- {r['variant']}: policy {fmt_params(r['policy_params'])} + value {fmt_params(r['value_params'])} params, "
                  f"{fmt_params(r['trainable_params'])} trainable, lr {r['lr']:g}; sampler backend {r['sampler_backend']}; "
                  f"autocast in the passes: {r['autocast']}; "
                  + (f"warm-up iteration(s) incl. loading {r['warmup_wall_s']:.1f} s; " if r["warmup_wall_s"] is not None else "")
                  + f"whole child run {r['run_seconds']:.0f} s")
        print()
        for line in on_paper(ok, not cpu):
            print(line)
    out = Path(args.out) if args.out else HERE / "results" / f"ppo-{args.device}{'-tiny' if args.tiny else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": {**a, "variants": variants, **env},
                               "on_paper": on_paper(ok, not cpu) if ok else [], "results": rows}, indent=1) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
