"""SFT training speed, side by side, in one run: loopchat's SFT trainer vs TRL's SFTTrainer.

    python benchmarks/sft.py                      # CPU, the embedded SmolLM2-135M-Instruct, 2 threads
    python benchmarks/sft.py --tiny --quick       # smoke run: a tiny random Llama with the real tokenizer
    python benchmarks/sft.py --model Qwen/Qwen2.5-0.5B-Instruct --steps 5
    python benchmarks/sft.py --device cuda        # GPU (run on one H200): ~1B Llama-shaped model, random weights, MFU

Needs TRL: pip install '.[bench]' (trl, which adds datasets, pandas, pyarrow).

Variants (each in its own subprocess, so its peak RSS / peak CUDA memory is its own):

  loopchat     loopchat.train.loop.Trainer.fit with loopchat.train.sft's packing (best-fit decreasing
               rows of max-seq-len tokens, block-diagonal mask, position ids restarting per
               conversation), sft_loss (assistant tokens only) -- exactly what `run_sft` runs,
               minus evaluation and the final checkpoint save.
  trl          TRL SFTTrainer as a user would set it up for conversational data: a `messages`
               dataset, one conversation per row, padded to the longest of each micro-batch.
               assistant_only_loss=True is tried first; TRL refuses templates without
               `{% generation %}` markers that it cannot patch (SmolLM2's), and then the run falls
               back to TRL's default for `messages` data: loss on every token (completion_only_loss
               only applies to prompt/completion datasets). The reason is in the results.
  trl-packed   the same with packing=True (TRL's BFD packing, which turns on padding_free: each
               micro-batch is flattened into ONE row with position ids restarting per
               conversation; with SDPA, transformers builds the block-diagonal mask from the position
               ids, over the whole flattened row).
  trl-gc       `trl` with TRL's own default gradient_checkpointing=True (what a user gets out of the
               box); the other TRL variants turn it off to match loopchat's default. Not run unless
               asked for with --variants.

What is held equal: the model and its weights (fp32 master weights), the tokenizer and pad token,
the conversations (the bundled demonstrations through loopchat.train.sft's reader and template
check; conversations longer than max-seq-len are dropped for both), max sequence length, bf16
autocast for forward/backward where the hardware has native bf16, fp32 elsewhere (TRL: bf16=True, use_cpu=True on CPU -> accelerate's
torch.autocast; each child checks on the first forward that a linear layer really runs under
autocast with a bf16 output and records it), AdamW fused for both (torch fused kernel; TRL
optim="adamw_torch_fused"), betas (0.9, 0.95), eps 1e-8, weight decay 0, clip 1.0, lr 2e-5,
linear warm-up + cosine to 10% (TRL: cosine_with_min_lr), the number of optimizer steps,
gradient accumulation, sequential data order (TRL: train_sampling_strategy="sequential"), and
torch threads.

Matching the effective batch (tokens per optimizer step). loopchat's step is `batch_size` packed
rows. We replay loopchat's own data order (step_indices over the packed rows) for warm-up + timed
steps and list the conversations it trains on, in order. TRL gets exactly that list:
  - trl:        a fixed number of conversations per step (TRL's batch is counted in
                conversations), a multiple of grad_accum (per_device_train_batch_size = that /
                grad_accum), chosen so that TRL's timed steps hold as many real tokens per step
                as loopchat's; both walk the same conversation list in the same order, and TRL
                additionally computes on the padding of each micro-batch.
  - trl-packed: TRL packs that list itself into rows of max-seq-len; per_device_train_batch_size =
                batch_size / grad_accum rows, like loopchat.
The table reports the measured real (non-padding) tokens per step for each, so any residual
difference is visible; tokens/s counts real tokens only.

Measured: wall time of the optimizer steps after one warm-up step (data collation, forward,
backward, clipping, optimizer, the trainers' own per-step logging), real tokens/s, sequences/s,
padding fraction (padding / tokens computed), peak RSS (or peak CUDA memory), loss of the last
step (sanity only: TRL's loss may cover every token while loopchat's covers the assistant's).

Prints a markdown table and writes benchmarks/results/sft-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from harness import add_mfu, autocast_probe, environment_line, in_subprocess, make_model, matmul_params, peak_mem, sync, versions  # noqa: E402

HERE = Path(__file__).resolve().parent
ALL_VARIANTS = ["loopchat", "trl", "trl-packed", "trl-gc"]
DEFAULT_VARIANTS = ["loopchat", "trl", "trl-packed"]


# ----------------------------------------------------------------------------- shared by the children


def load_model(a: dict):
    """(model, tokenizer): fp32 master weights on CPU (as run_sft loads them); on CUDA a
    Llama-3.2-1B-shaped model with random weights and the embedded tokenizer (no download)."""
    import torch

    from loopchat import models

    if a["device"] == "cpu":
        return models.load(a["model"], device="cpu", dtype=torch.float32, eval_mode=False)
    # --- CUDA path (run on one H200, 2026-12-04) ---
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = models.load_tokenizer(a.get("tokenizer") or models.resolve_spec("default").path)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096, tie_word_embeddings=True,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg)  # fp32 master weights; bf16 comes from autocast, as on CPU
    model.train()
    return model, tok


def load_conversations(tok, a: dict):
    """[(messages, Example)] in file order: loopchat.train.sft's reader and labelling; what it
    skips (too long, no assistant reply) is skipped for both trainers."""
    from loopchat.data.formats import read_file, sft_messages
    from loopchat.train.sft import Example, SkipExample, data_files, tokenize_conversation

    out = []
    for f in data_files(a["data"]):
        for rec in read_file(f):
            for msgs in sft_messages(rec):
                try:
                    ids, labels = tokenize_conversation(tok, msgs, a["max_seq_len"])
                except SkipExample:
                    continue
                out.append((msgs, Example(ids, labels, group=len(out))))
                if a["conversations"] and len(out) >= a["conversations"]:
                    return out
    return out


def plan(tok, a: dict) -> dict:
    """loopchat's packed rows, and the conversations its warm-up + timed steps train on, in order."""
    from loopchat.train.loop import step_indices
    from loopchat.train.sft import pack

    convs = load_conversations(tok, a)
    rows = pack([e for _, e in convs], a["max_seq_len"])
    total = a["steps"] + 1
    steps = [[ex.group for r in step_indices(len(rows), a["batch_size"], k, a["seed"])[1] for ex in rows[r]] for k in range(total)]
    order = [g for s in steps for g in s]
    # TRL's conversations per step (a multiple of grad_accum): the count whose timed steps (all
    # but the first; TRL's sequential sampler starts the list over if it runs out) hold as many
    # real tokens per step as loopchat's timed steps.
    n_tok = [len(c[1].input_ids) for c in convs]
    ours = sum(n_tok[g] for s in steps[1:] for g in s) / max(1, a["steps"])
    ga = a["grad_accum"]

    def trl_tokens(c: int) -> float:
        return sum(n_tok[order[i % len(order)]] for i in range(c, c * total)) / max(1, a["steps"])

    per_step = min(range(ga, 2 * len(order) // total + 2 * ga, ga), key=lambda c: abs(trl_tokens(c) - ours))
    return {"convs": convs, "rows": rows, "order": order, "trl_convs_per_step": per_step}


class Meter:
    """Per optimizer step: real tokens, computed tokens, sequences, loss tokens, sum of
    squared sequence lengths (attention flops), and the time the step ended."""

    def __init__(self, device: str):
        self.device = device
        self.cur = dict(real=0, computed=0, seqs=0, loss_tokens=0, sumsq=0, attn_len=0)
        self.steps: list[dict] = []

    def add(self, **kw) -> None:
        for k, v in kw.items():
            self.cur[k] = max(self.cur[k], v) if k == "attn_len" else self.cur[k] + v

    def mark(self) -> None:
        sync(self.device)
        self.steps.append({**self.cur, "t": time.perf_counter(), "peak_mib": peak_mem(self.device)})
        self.cur = dict.fromkeys(self.cur, 0)

    def summary(self) -> dict:
        warm, timed = self.steps[0], self.steps[1:]
        if not timed:
            raise RuntimeError("no timed steps (need --steps >= 1)")
        dt = timed[-1]["t"] - warm["t"]
        tot = {k: sum(s[k] for s in timed) for k in ("real", "computed", "seqs", "loss_tokens", "sumsq")}
        n = len(timed)
        return {
            "steps_timed": n, "seconds": dt,
            "real_tokens_per_step": tot["real"] / n, "computed_tokens_per_step": tot["computed"] / n,
            "seqs_per_step": tot["seqs"] / n, "loss_tokens_per_step": tot["loss_tokens"] / n,
            "padding_fraction": 1 - tot["real"] / max(1, tot["computed"]),
            "loss_token_fraction": tot["loss_tokens"] / max(1, tot["real"]),
            "tokens_per_s": tot["real"] / dt, "seqs_per_s": tot["seqs"] / dt,
            "sumsq_per_step": tot["sumsq"] / n, "max_attention_len": max(s["attn_len"] for s in self.steps),
            "peak_mem_mib": timed[-1]["peak_mib"],
        }


# ----------------------------------------------------------------------------- the variants


def run_loopchat(a: dict) -> dict:
    from loopchat.train.loop import Trainer
    from loopchat.train.sft import SFTConfig, make_collate, sft_loss

    model, tok = load_model(a)
    p = plan(tok, a)
    out = tempfile.mkdtemp(prefix="bench-sft-loopchat-")
    cfg = SFTConfig(model=a["model"] if a["device"] == "cpu" else "default", out=out, max_seq_len=a["max_seq_len"],
                    batch_size=a["batch_size"], grad_accum=a["grad_accum"], max_steps=a["steps"] + 1, lr=a["lr"],
                    eval_every=0, save_every=0, log_every=1, seed=a["seed"], bf16=a["bf16"], eval_fraction=0.0)
    meter = Meter(a["device"])
    seen: dict = {}
    try:
        trainer = Trainer(cfg, model, tok, kind="sft")
        base_collate = make_collate(tok.pad_token_id)

        def collate(rows):
            b = base_collate(rows)
            lens = [len(e.input_ids) for r in rows for e in r]
            meter.add(real=b["num_tokens"], computed=b["input_ids"].numel(), seqs=len(lens), loss_tokens=b["num_units"],
                      sumsq=sum(n * n for n in lens), attn_len=b["input_ids"].shape[1])
            return b

        def loss_fn(m, batch):  # as in run_sft
            loss, n, metrics = sft_loss(m, batch)
            return loss, n, {**metrics, "pad_frac": batch["num_padding"] / batch["input_ids"].numel()}

        step = trainer.optimizer_step

        def timed_step():
            gn = step()
            meter.mark()
            return gn

        trainer.optimizer_step = timed_step
        trainer.finish = lambda: None  # no final checkpoint / state save: not part of the steps timed
        hook = autocast_probe(model, a["device"], seen)
        trainer.fit(p["rows"], [], collate, loss_fn)
        hook.remove()
        final_loss = next(r["loss"] for r in reversed(trainer.history) if "loss" in r)
        opt = trainer.optimizer
        inner = getattr(opt, "optimizer", opt)
        fused = bool(inner.param_groups[0].get("fused"))
        n_matmul = matmul_params(model)
        cfg_m = getattr(model, "config", None) or trainer.accelerator.unwrap_model(model).config
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {**meter.summary(), "final_loss": final_loss, **seen, "optimizer": f"torch AdamW fused={fused}",
            "loss_on": "assistant tokens (+ their end-of-turn token)", "n_matmul_params": n_matmul,
            "n_layers": cfg_m.num_hidden_layers, "d_model": cfg_m.hidden_size, "notes": []}


def run_trl(a: dict, variant: str) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    model, tok = load_model(a)
    p = plan(tok, a)
    packed, gc = variant == "trl-packed", variant == "trl-gc"
    convs = p["convs"]
    ds = Dataset.from_list([{"messages": convs[i][0]} for i in p["order"]])
    ga = a["grad_accum"]
    micro = a["batch_size"] // ga if packed else p["trl_convs_per_step"] // ga
    total = a["steps"] + 1
    out = tempfile.mkdtemp(prefix=f"bench-sft-{variant}-")
    meter = Meter(a["device"])
    seen: dict = {}
    notes: list[str] = []

    class Counting(SFTTrainer):
        def training_step(self, *args, **kwargs):
            inputs = args[1] if len(args) > 1 else kwargs["inputs"]
            ids, labels = inputs["input_ids"], inputs["labels"]
            if "attention_mask" in inputs:  # padded: one conversation per row
                lens = inputs["attention_mask"].sum(1)
            else:  # padding-free: one flattened row, conversations delimited by cu_seq_lens
                lens = inputs["cu_seq_lens_q"].diff()
            meter.add(real=int(lens.sum()), computed=ids.numel(), seqs=int(lens.numel()),
                      loss_tokens=int((labels[:, 1:] != -100).sum()), sumsq=int((lens.long() ** 2).sum()), attn_len=ids.shape[1])
            return super().training_step(*args, **kwargs)

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            meter.mark()

    def config(assistant_only: bool) -> SFTConfig:
        return SFTConfig(
            output_dir=out, max_steps=total, per_device_train_batch_size=micro, gradient_accumulation_steps=ga,
            learning_rate=a["lr"], lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
            warmup_steps=round(0.05 * total), adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, weight_decay=0.0,
            max_grad_norm=1.0, optim="adamw_torch_fused", bf16=a["bf16"], use_cpu=a["device"] == "cpu",
            gradient_checkpointing=gc, max_length=a["max_seq_len"], packing=packed,
            assistant_only_loss=assistant_only, logging_steps=1, save_strategy="no", eval_strategy="no",
            report_to="none", seed=a["seed"], train_sampling_strategy="sequential", dataloader_num_workers=0,
            disable_tqdm=True,
        )

    try:
        try:
            trainer = Counting(model=model, args=config(True), train_dataset=ds, processing_class=tok, callbacks=[Timer()])
            loss_on = "assistant tokens (assistant_only_loss=True)"
        except ValueError as e:
            notes.append(f"assistant_only_loss=True refused by TRL ({str(e).split(' Please')[0][:200]}); "
                         "fell back to TRL's default for messages data: loss on every token")
            trainer = Counting(model=model, args=config(False), train_dataset=ds, processing_class=tok, callbacks=[Timer()])
            loss_on = "every token (TRL default for messages data)"
        if packed:
            notes.append(f"padding_free={trainer.padding_free}; attention over the flattened micro-batch row "
                         f"({model.config._attn_implementation})")
        hook = autocast_probe(trainer.model, a["device"], seen)
        trainer.train()
        hook.remove()
        final_loss = next(r["loss"] for r in reversed(trainer.state.log_history) if "loss" in r)
        opt = trainer.optimizer
        inner = getattr(opt, "optimizer", opt)
        fused = bool(inner.param_groups[0].get("fused"))
        n_matmul = matmul_params(model)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    if len(meter.steps) != total:
        notes.append(f"ran {len(meter.steps)} optimizer steps, expected {total}")
    return {**meter.summary(), "final_loss": final_loss, **seen, "optimizer": f"torch AdamW fused={fused} (optim={getattr(trainer.args.optim, 'value', trainer.args.optim)})",
            "loss_on": loss_on, "gradient_checkpointing": gc, "per_device_train_batch_size": micro,
            "n_matmul_params": n_matmul, "n_layers": model.config.num_hidden_layers, "d_model": model.config.hidden_size,
            "notes": notes}


def child(variant: str, a: dict) -> dict:
    import torch

    torch.set_num_threads(a["threads"])
    r = run_loopchat(a) if variant == "loopchat" else run_trl(a, variant)
    r.update(variant=variant, device=a["device"], threads=a["threads"])
    if a["device"] == "cuda":
        add_mfu(r)
    return r


# ----------------------------------------------------------------------------- the parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--model", default="default", help="model spec for both trainers (CPU; CUDA uses a random ~1B Llama)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random Llama with the real tokenizer (smoke runs)")
    ap.add_argument("--tokenizer", help="folder with the embedded model's tokenizer, for the random models (--tiny, CUDA) on a "
                    "machine without the embedded model (default: the embedded model's)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 timed steps, max-seq-len 512, 4 rows x 2 micro-steps")
    ap.add_argument("--steps", type=int, help="timed optimizer steps after the warm-up step (default 10 CPU, 20 CUDA, 2 quick)")
    ap.add_argument("--max-seq-len", type=int, help="default 1024 (512 with --quick)")
    ap.add_argument("--batch-size", type=int, help="loopchat packed rows per optimizer step (default 8 CPU, 32 CUDA, 4 quick)")
    ap.add_argument("--grad-accum", type=int, help="micro-steps per optimizer step (default 4, 2 quick)")
    ap.add_argument("--conversations", type=int, default=0, help="use only the first N conversations (0 = all)")
    ap.add_argument("--data", action="append", default=[], help="SFT data file/folder (default: the bundled demonstrations)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "2")), help="torch threads (default 2)")
    ap.add_argument("--variants", nargs="+", choices=ALL_VARIANTS, default=DEFAULT_VARIANTS)
    ap.add_argument("--out", help="JSON path (default benchmarks/results/sft-<device>.json; --tiny: sft-<device>-tiny.json)")
    ap.add_argument("--child", nargs=2, metavar=("VARIANT", "ARGS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        variant, a = args.child
        print(json.dumps(child(variant, json.loads(a))))
        return

    cpu = args.device == "cpu"
    q = args.quick
    from loopchat.models import native_bf16

    # bf16 autocast for every variant where the hardware runs it natively (emulated bf16 is >10x slower)
    a = {
        "device": args.device, "bf16": native_bf16(args.device), "model": args.model, "data": args.data, "threads": args.threads, "seed": 0, "lr": 2e-5,
        "steps": args.steps or (2 if q else 10 if cpu else 20),
        "max_seq_len": args.max_seq_len or (512 if q else 1024),
        "batch_size": args.batch_size or (4 if q else 8 if cpu else 32),
        "grad_accum": args.grad_accum or (2 if q else 4),
        "conversations": args.conversations, "tokenizer": args.tokenizer,
    }
    if a["batch_size"] % a["grad_accum"]:
        ap.error("--batch-size must be a multiple of --grad-accum")
    tmp = None
    if args.tiny and cpu:
        tmp = Path(tempfile.mkdtemp(prefix="bench-sft-tiny-"))
        a["model"] = make_model(tmp, tokenizer=args.tokenizer)
    label = "tiny random Llama (2 layers, d=64)" if args.tiny else (a["model"] if cpu else "random Llama-3.2-1B-shaped")
    print(f"model: {label}; {a['steps']} timed steps after 1 warm-up; max_seq_len {a['max_seq_len']}; "
          f"loopchat {a['batch_size']} packed rows x {a['grad_accum']} micro-steps; {a['threads']} threads", file=sys.stderr)
    rows = []
    try:
        for v in args.variants:
            t0 = time.perf_counter()
            r = in_subprocess(__file__, v, a)
            rows.append(r)
            if not r.get("failed"):
                print(f"  {v:12s} {r['tokens_per_s']:9.1f} real tok/s  ({time.perf_counter() - t0:.0f} s incl. load)", file=sys.stderr)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    env = versions(trl=True)
    print(f"\n{environment_line(cpu, a['threads'], env)}; model: {label}\n")
    ok = [r for r in rows if not r.get("failed")]
    base = next((r["tokens_per_s"] for r in ok if r["variant"] == "trl"), None)
    mfu = not cpu
    print("| variant | steps | real tokens/step | seqs/step | padding | tokens/s | seqs/s | vs trl (padded) | peak MiB | final loss | loss on |"
          + (" MFU |" if mfu else ""))
    print("|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if mfu else ""))
    for r in rows:
        if r.get("failed"):
            print(f"| {r['variant']} | failed: {r['error'].splitlines()[-1][:120] if r['error'] else '?'} |")
            continue
        sp = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        print(f"| {r['variant']} | {r['steps_timed']} | {r['real_tokens_per_step']:.0f} | {r['seqs_per_step']:.1f} | "
              f"{100 * r['padding_fraction']:.1f}% | {r['tokens_per_s']:.1f} | {r['seqs_per_s']:.2f} | {sp} | {r['peak_mem_mib']:.0f} | "
              f"{r['final_loss']:.3f} | {r['loss_on'].split(' (')[0]} |" + (f" {100 * r['mfu']:.1f}% |" if mfu else ""))
    print()
    for r in ok:
        print(f"- {r['variant']}: autocast={r.get('autocast')} ({r.get('compute_dtype')}), {r['optimizer']}, "
              f"max attention length {r['max_attention_len']}" + "".join(f"; {n}" for n in r["notes"]))
    out = Path(args.out) if args.out else HERE / "results" / f"sft-{args.device}{'-tiny' if args.tiny else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": {**a, "model_label": label, **env},
                               "results": rows}, indent=1) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
