"""Reward-model training speed, side by side, in one run: loopchat's reward trainer vs TRL's RewardTrainer.

    python benchmarks/rm.py                      # CPU, the embedded SmolLM2-135M(-Instruct), 2 threads
    python benchmarks/rm.py --tiny --quick       # smoke run: a tiny random Llama with the real tokenizer
    python benchmarks/rm.py --k 6 --steps 5      # synthetic rankings of 6 replies
    python benchmarks/rm.py --data-source bundled   # the bundled comparison set (fails if it does not load)
    python benchmarks/rm.py --device cuda        # GPU (UNTESTED): ~1B Llama-shaped model, random weights, MFU

Needs TRL: pip install '.[bench]' (trl, which adds datasets, pandas, pyarrow).

Variants (each in its own subprocess, so its peak RSS / peak CUDA memory is its own):

  loopchat       loopchat.train.reward.RewardTrainer.fit with make_collate and rm_loss -- exactly what
                 `run_rm` runs (prepare_data, ScoreModel, the shared Trainer), minus evaluation and
                 the final normalisation offset + checkpoint save. A batch element is a RANKING:
                 its K replies go through the model once (K forward rows) and the loss covers all
                 C(K, 2) of its pairs, indexed into those rows.
  loopchat-flat  the same Trainer, model, rm_loss and pairs, but a flat pairwise loader: a batch
                 element is ONE (better, worse) pair, collated as its own two rows (flat_collate
                 below: each pair becomes a 2-reply item for make_collate), so a K-way ranking
                 costs 2 * C(K, 2) forward rows (12 instead of 4 at K = 4). Only the batching
                 differs from `loopchat`.
  trl            TRL RewardTrainer as a user would set it up: a conversational preference dataset
                 ({"prompt": messages, "chosen": [assistant message], "rejected": [...]}, which TRL
                 tokenises with the chat template), chosen rows then rejected rows of each
                 micro-batch right-padded to its longest, AutoModelForSequenceClassification's
                 own last-non-pad-token pooling, -logsigmoid(chosen - rejected).mean().
                 With --trl-input ids, TRL gets loopchat's token ids instead (a pre-tokenised
                 chosen_ids / rejected_ids dataset), so both compute on exactly the same tokens.

The pairs. The training rankings come from loopchat.train.reward.prepare_data (the data's own
"train" split when it has a held-out one; eval_fraction 0 otherwise). We replay loopchat's own
data order (step_indices over the rankings) for the warm-up + timed steps and list the pairs
those steps train on, in order (within a ranking, ranking_pairs' order). loopchat-flat and trl
get exactly that list:
  - pairs per optimizer step P = the pairs of a K-way step (batch_size * C(K, 2) when every
    ranking has K replies -- the synthetic set); with mixed K (the bundled set: K = 4..6) the
    multiple of grad_accum nearest the K-way run's mean, and the table shows each run's real
    pairs per step;
  - loopchat-flat: the list is laid out so that the Trainer's own (seeded) epoch order visits
    it in order; the child checks that the pairs it collated are the planned ones, in order;
  - trl: the list as the dataset, train_sampling_strategy="sequential", per_device_train_batch_size
    = P / grad_accum pairs (2 rows each); the child checks that TRL's max_length filter dropped
    none. With a fixed K the micro-batches of all three variants hold the same pairs.

What is held equal: the model and its weights (loopchat.train.reward.load_reward_model: the
checkpoint through AutoModelForSequenceClassification num_labels=1, zero-initialised score head,
fp32 master weights, the tokenizer's pad token <|endoftext|> as config.pad_token_id -- TRL gets
that same model object and tokenizer), max sequence length (RMConfig's 768; longer rankings are
skipped by prepare_data, and TRL's max_length filter is checked to drop nothing), bf16 autocast
for forward/backward where the hardware has native bf16, fp32 elsewhere (TRL: bf16=True, use_cpu=True on CPU -> accelerate's torch.autocast; each
child checks on the first forward that a linear layer really runs under autocast with a bf16
output and records it), AdamW fused for both (TRL optim="adamw_torch_fused"), betas (0.9, 0.95),
eps 1e-8, weight decay 0, clip 1.0, lr 2e-5, linear warm-up (5% of the steps) + cosine to 10%
(TRL: cosine_with_min_lr), the number of optimizer steps, gradient accumulation, no gradient
checkpointing (TRL's RewardConfig defaults to it ON; turned off here), no center_rewards_coefficient,
dropout off (TRL disable_dropout=True; SmolLM2 has none anyway), sdpa attention, right padding,
and torch threads.

What is not (by construction or by TRL's design), and shows in the table:
  - forward rows per pair: the point of the comparison (K-way: K / C(K, 2); flat and TRL: 2);
  - TRL's default conversational tokenisation renders prompt + reply through the chat template,
    which ends the reply with "<|im_end|>\\n": one token more per row than loopchat's
    prompt-with-generation-header + reply + EOS (loopchat scores exactly what PPO's policy
    produces). The real tokens per pair column shows it; --trl-input ids removes it;
  - the loss is the same function (mean over the step's pairs of -log sigmoid(r_b - r_w)), but
    TRL averages per micro-batch and divides by grad_accum; with equal-sized micro-batches
    (fixed K) that is the same number. The first step's loss is log 2 = 0.693 for all variants
    (zero head); the last loss is a sanity check only;
  - loopchat's forward (token_scores) calls the backbone without use_cache=False, so with the
    checkpoint's use_cache=true transformers builds a DynamicCache in every training forward (it
    only holds references to K/V tensors that autograd keeps anyway); TRL passes use_cache=False;
  - TRL's compute_loss also gathers logits and computes min/mean/max reward, accuracy and margin
    every micro-step (.item() syncs); loopchat's rm_loss computes accuracy and margin. Both are
    part of what each trainer costs.

Measured: wall time of the optimizer steps after one warm-up step (data collation, forward,
backward, clipping, optimizer, the trainers' own per-step logging), pairs/s (the target
metric), real (non-padding) tokens/s, forward rows per pair, real tokens per pair, padding
fraction (padding / tokens computed), peak RSS (or peak CUDA memory), loss of the last step.

Data: --data-source auto (default) uses the bundled comparisons
(loopchat/data/bundled/comparisons/*.jsonl, ranking JSONL) when they load as rankings, and
otherwise says why and falls back to `synthetic`: for each bundled SFT demonstration, K replies
= its own reply and K-1 other demonstrations' replies (seeded choice), ranked in that order
(own reply best). --data FILE uses your own ranking / preference files.

Defaults (CPU): 4 timed steps after the warm-up, K = 4, 4 rankings (24 pairs) per step in 2
micro-steps (RMConfig's default is 8 rankings; 4 keeps the whole run at about 5-8 minutes on 2
cores: per step about 2.4k real tokens K-way and 7.2k flat), max_seq_len 768, 2 threads.

Prints a markdown table and writes benchmarks/results/rm-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

from harness import add_mfu, autocast_probe, environment_line, eprint, in_subprocess, make_model, matmul_params, peak_mem, sync, versions  # noqa: E402

HERE = Path(__file__).resolve().parent
ALL_VARIANTS = ["loopchat", "loopchat-flat", "trl"]


# ----------------------------------------------------------------------------- shared by the children


def load_model(a: dict):
    """(model, tokenizer): the reward model as run_rm loads it (fp32, zero head, pad token set);
    on CUDA a Llama-3.2-1B-shaped sequence classifier with random weights and the embedded
    tokenizer (no download)."""
    import torch

    from loopchat.train.reward import OFFSET_KEY, load_reward_model

    if a["device"] == "cpu":
        return load_reward_model(a["model"], device="cpu", dtype=torch.float32, eval_mode=False)
    # --- CUDA path: UNTESTED (written without a GPU) ---
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from loopchat import models

    tok = models.load_tokenizer(models.resolve_spec("default").path)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096, tie_word_embeddings=False,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, num_labels=1)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForSequenceClassification(cfg)  # fp32 master weights; bf16 comes from autocast, as on CPU
    torch.nn.init.zeros_(model.score.weight)
    setattr(model.config, OFFSET_KEY, 0.0)
    model.train()
    return model, tok


def rm_config(a: dict, out: str, batch_size: int, total: int):
    from loopchat.train.reward import RMConfig

    return RMConfig(model=a["model"] if a["device"] == "cpu" else "default", data=a["data"], out=out, max_seq_len=a["max_seq_len"],
                    batch_size=batch_size, grad_accum=a["grad_accum"], max_steps=total, epochs=float(total), lr=a["lr"],
                    eval_every=0, save_every=0, log_every=1, seed=a["seed"], bf16=a["bf16"], eval_fraction=0.0)


def plan(tok, a: dict) -> dict:
    """The training rankings (prepare_data, as run_rm), the rankings loopchat's warm-up + timed
    steps train on, and the pairs of those steps in order: [(ranking index, better, worse)]."""
    from loopchat.train.loop import step_indices
    from loopchat.train.reward import prepare_data

    total = a["steps"] + 1
    train, _, summary = prepare_data(tok, rm_config(a, "", a["batch_size"], total), log=eprint)
    steps = [step_indices(len(train), a["batch_size"], k, a["seed"])[1] for k in range(total)]
    pairs = [(r, b, w) for s in steps for r in s for b, w in train[r].pairs]
    kway = [sum(len(train[r].pairs) for r in s) for s in steps]
    ga = a["grad_accum"]
    if len(set(kway)) == 1 and kway[0] % ga == 0:
        P = kway[0]  # fixed K: a flat step covers exactly the pairs of a K-way step
    else:  # mixed K: the multiple of grad_accum nearest the K-way timed steps' mean
        mean = sum(kway[1:]) / max(1, len(kway) - 1)
        P = max(ga, ga * round(mean / ga))
    flat = [pairs[i % len(pairs)] for i in range(total * P)]
    return {"train": train, "summary": summary, "steps": steps, "pairs": flat, "pairs_per_step": P,
            "kway_pairs_per_step": kway, "fixed_k": len(set(kway)) == 1 and P == kway[0]}


def flat_collate(train: list, pad_id: int, seen: list):
    """The flat pairwise loader: an item is a (ranking index, better, worse) pair and becomes its
    own two forward rows (a 2-reply item for make_collate, pair (0, 1))."""
    from loopchat.train.reward import RankItem, make_collate

    base = make_collate(pad_id)

    def collate(items: list) -> dict:
        seen.extend(items)
        return base([RankItem(train[r].prompt_ids, [train[r].responses[b], train[r].responses[w]], [(0, 1)]) for r, b, w in items])

    return collate


def arrange_for_trainer(seq: list, batch_size: int, seed: int) -> list:
    """Lay `seq` out so that Trainer.fit's own epoch-0 order (step_indices) visits it in order:
    step k takes seq[k*batch_size : (k+1)*batch_size]."""
    from loopchat.train.loop import epoch_order

    order = epoch_order(len(seq), 0, seed)
    out = [None] * len(seq)
    for i, j in enumerate(order):
        out[j] = seq[i]
    return out


class Meter:
    """Per optimizer step: pairs, forward rows, real tokens, computed tokens, sum of squared
    row lengths (attention flops), and the time the step ended."""

    KEYS = ("pairs", "rows", "real", "computed", "sumsq")

    def __init__(self, device: str):
        self.device = device
        self.cur = dict.fromkeys(self.KEYS + ("attn_len",), 0)
        self.steps: list[dict] = []

    def add(self, mask, pairs: int) -> None:
        lens = mask.sum(1).long()
        self.cur["pairs"] += int(pairs)
        self.cur["rows"] += int(mask.shape[0])
        self.cur["real"] += int(lens.sum())
        self.cur["computed"] += int(mask.numel())
        self.cur["sumsq"] += int((lens**2).sum())
        self.cur["attn_len"] = max(self.cur["attn_len"], int(mask.shape[1]))

    def mark(self) -> None:
        sync(self.device)
        self.steps.append({**self.cur, "t": time.perf_counter(), "peak_mib": peak_mem(self.device)})
        self.cur = dict.fromkeys(self.cur, 0)

    def summary(self) -> dict:
        warm, timed = self.steps[0], self.steps[1:]
        if not timed:
            raise RuntimeError("no timed steps (need --steps >= 1)")
        dt = timed[-1]["t"] - warm["t"]
        tot = {k: sum(s[k] for s in timed) for k in self.KEYS}
        n = len(timed)
        return {
            "steps_timed": n, "seconds": dt, "seconds_per_step": dt / n,
            "pairs_per_step": tot["pairs"] / n, "rows_per_step": tot["rows"] / n,
            "real_tokens_per_step": tot["real"] / n, "computed_tokens_per_step": tot["computed"] / n,
            "rows_per_pair": tot["rows"] / max(1, tot["pairs"]), "real_tokens_per_pair": tot["real"] / max(1, tot["pairs"]),
            "padding_fraction": 1 - tot["real"] / max(1, tot["computed"]),
            "pairs_per_s": tot["pairs"] / dt, "tokens_per_s": tot["real"] / dt, "rows_per_s": tot["rows"] / dt,
            "sumsq_per_step": tot["sumsq"] / n, "max_attention_len": max(s["attn_len"] for s in self.steps),
            "peak_mem_mib": timed[-1]["peak_mib"], "pairs_warmup_step": warm["pairs"],
        }


# ----------------------------------------------------------------------------- the variants


def run_loopchat(a: dict, variant: str) -> dict:
    from loopchat.train.reward import RewardTrainer, make_collate, rm_loss

    model, tok = load_model(a)
    p = plan(tok, a)
    train, total, flat = p["train"], a["steps"] + 1, variant == "loopchat-flat"
    out = tempfile.mkdtemp(prefix=f"bench-rm-{variant}-")
    meter = Meter(a["device"])
    seen: dict = {}
    notes: list[str] = []
    visited: list = []
    try:
        if flat:
            items, bs = arrange_for_trainer(p["pairs"], p["pairs_per_step"], a["seed"]), p["pairs_per_step"]
            base_collate = flat_collate(train, tok.pad_token_id, visited)
        else:
            items, bs = train, a["batch_size"]
            base = make_collate(tok.pad_token_id)

            def base_collate(rankings):
                visited.extend(id(r) for r in rankings)
                return base(rankings)

        trainer = RewardTrainer(rm_config(a, out, bs, total), model, tok, demos=[])

        def collate(batch_items):
            b = base_collate(batch_items)
            meter.add(b["attention_mask"], b["num_units"])
            return b

        step = trainer.optimizer_step

        def timed_step():
            gn = step()
            meter.mark()
            return gn

        trainer.optimizer_step = timed_step
        # No normalisation offset (scores 256 demonstrations), no final checkpoint / state save:
        # not part of the steps timed.
        trainer.finish = lambda: None
        hook = autocast_probe(trainer.model, a["device"], seen, skip="score")
        trainer.fit(items, [], collate, rm_loss)
        hook.remove()
        hist = [r for r in trainer.history if "loss" in r]
        final_loss, final_acc = hist[-1]["loss"], hist[-1].get("accuracy")
        opt = trainer.optimizer
        inner = getattr(opt, "optimizer", opt)
        fused = bool(inner.param_groups[0].get("fused"))
        hf = trainer.hf_model()
        n_matmul = matmul_params(hf)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    # The data order really was the planned one (the pairs that trl trains on).
    if flat:
        ok = visited == p["pairs"]
        notes.append(f"pair order {'= the K-way run' if ok else 'DIFFERS from the plan'} ({len(visited)} pairs collated)")
    else:
        want = [id(train[r]) for s in p["steps"] for r in s]
        ok = visited == want
        notes.append(f"ranking order {'= the plan' if ok else 'DIFFERS from the plan'} ({len(visited)} rankings collated)")
    if len(meter.steps) != total:
        notes.append(f"ran {len(meter.steps)} optimizer steps, expected {total}")
    ks = sorted({len(it.responses) for s in p["steps"] for it in (train[r] for r in s)})
    return {**meter.summary(), "final_loss": final_loss, "final_accuracy": final_acc, **seen, "order_ok": ok,
            "optimizer": f"torch AdamW fused={fused}", "K": ks if not flat else [2], "n_matmul_params": n_matmul,
            "n_layers": hf.config.num_hidden_layers, "d_model": hf.config.hidden_size, "notes": notes,
            "data_summary": {k: v for k, v in p["summary"].items() if k != "files"}, "pairs_per_step_plan": p["pairs_per_step"],
            "kway_pairs_per_step": p["kway_pairs_per_step"], "fixed_k": p["fixed_k"]}


def ranking_texts(tok, a: dict, train: list) -> list[dict]:
    """The ranking row (prompt messages, reply texts) of each training RankItem, for TRL's
    conversational input: every row of the data files through rows_to_items again, matched on
    the token ids."""
    from loopchat.data.formats import ranking_rows, read_file
    from loopchat.train.reward import RMDataSummary, data_files, rows_to_items

    by_ids: dict = {}
    for f in data_files(a["data"]):
        for rec in read_file(f):
            for row in ranking_rows(rec):
                for it in rows_to_items(tok, [row], a["max_seq_len"], RMDataSummary(), f.name):
                    by_ids.setdefault((tuple(it.prompt_ids), tuple(map(tuple, it.responses))), row)
    return [by_ids[(tuple(it.prompt_ids), tuple(map(tuple, it.responses)))] for it in train]


def run_trl(a: dict) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import RewardConfig, RewardTrainer

    model, tok = load_model(a)
    p = plan(tok, a)
    train, total, ga = p["train"], a["steps"] + 1, a["grad_accum"]
    notes: list[str] = []
    if a["trl_input"] == "ids":
        ds = Dataset.from_list([{"chosen_ids": train[r].prompt_ids + train[r].responses[b],
                                 "rejected_ids": train[r].prompt_ids + train[r].responses[w]} for r, b, w in p["pairs"]])
        notes.append("input: loopchat's token ids (pre-tokenised chosen_ids/rejected_ids)")
    else:
        rows = ranking_texts(tok, a, train)

        def msg(text):
            return [{"role": "assistant", "content": text}]

        ds = Dataset.from_list([{"prompt": rows[r]["prompt"], "chosen": msg(rows[r]["responses"][b]),
                                 "rejected": msg(rows[r]["responses"][w])} for r, b, w in p["pairs"]])
        notes.append("input: conversational prompt/chosen/rejected, tokenised by TRL with the chat template")
    micro = p["pairs_per_step"] // ga
    out = tempfile.mkdtemp(prefix="bench-rm-trl-")
    meter = Meter(a["device"])
    seen: dict = {}

    class Counting(RewardTrainer):
        def training_step(self, *args, **kwargs):
            inputs = args[1] if len(args) > 1 else kwargs["inputs"]
            meter.add(inputs["attention_mask"], inputs["input_ids"].shape[0] // 2)
            return super().training_step(*args, **kwargs)

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            meter.mark()

    cfg = RewardConfig(
        output_dir=out, max_steps=total, per_device_train_batch_size=micro, gradient_accumulation_steps=ga,
        learning_rate=a["lr"], lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
        warmup_steps=round(0.05 * total), adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, weight_decay=0.0,
        max_grad_norm=1.0, optim="adamw_torch_fused", bf16=a["bf16"], use_cpu=a["device"] == "cpu",
        gradient_checkpointing=False, max_length=a["max_seq_len"], center_rewards_coefficient=None, disable_dropout=True,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", seed=a["seed"],
        train_sampling_strategy="sequential", dataloader_num_workers=0, disable_tqdm=True,
    )
    try:
        trainer = Counting(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Timer()])
        kept = len(trainer.train_dataset)
        if kept != len(ds):
            notes.append(f"TRL's max_length filter dropped {len(ds) - kept} of {len(ds)} pairs: the pair order shifted")
        first = trainer.train_dataset[0]
        r0, b0, _ = p["pairs"][0]
        ours = train[r0].prompt_ids + train[r0].responses[b0]
        d = len(first["chosen_ids"]) - len(ours)
        notes.append("first chosen row: identical to loopchat's tokens" if first["chosen_ids"] == ours else
                     f"first chosen row: {len(first['chosen_ids'])} tokens vs loopchat's {len(ours)} ({d:+d}; TRL ends "
                     f"with {tok.decode(first['chosen_ids'][-2:])!r}, loopchat with {tok.decode(ours[-2:])!r})")
        hook = autocast_probe(trainer.model, a["device"], seen, skip="score")
        trainer.train()
        hook.remove()
        hist = [r for r in trainer.state.log_history if "loss" in r]
        final_loss, final_acc = hist[-1]["loss"], hist[-1].get("accuracy")
        opt = trainer.optimizer
        inner = getattr(opt, "optimizer", opt)
        fused = bool(inner.param_groups[0].get("fused"))
        n_matmul = matmul_params(model)
        notes.append(f"attention {model.config._attn_implementation}; gradient_checkpointing={trainer.args.gradient_checkpointing}")
    finally:
        shutil.rmtree(out, ignore_errors=True)
    if len(meter.steps) != total:
        notes.append(f"ran {len(meter.steps)} optimizer steps, expected {total}")
    return {**meter.summary(), "final_loss": final_loss, "final_accuracy": final_acc, **seen, "K": [2],
            "optimizer": f"torch AdamW fused={fused} (optim={getattr(trainer.args.optim, 'value', trainer.args.optim)})",
            "per_device_train_batch_size": micro, "n_matmul_params": n_matmul, "n_layers": model.config.num_hidden_layers,
            "d_model": model.config.hidden_size, "notes": notes}


def child(variant: str, a: dict) -> dict:
    import torch

    torch.set_num_threads(a["threads"])
    r = run_trl(a) if variant == "trl" else run_loopchat(a, variant)
    r.update(variant=variant, device=a["device"], threads=a["threads"])
    if a["device"] == "cuda":  # --- UNTESTED ---
        add_mfu(r)
    return r


# ----------------------------------------------------------------------------- the parent


def bundled_comparisons() -> tuple[list[str], str]:
    """(files, "") if the bundled comparison set loads as rankings, else ([], why not)."""
    from loopchat.data.formats import ranking_rows, read_file
    from loopchat.train.reward import BUNDLED_COMPARISONS

    files = sorted(BUNDLED_COMPARISONS.glob("*.jsonl"))
    if not files:
        return [], f"no *.jsonl in {BUNDLED_COMPARISONS}"
    try:
        n = sum(1 for f in files for rec in read_file(f) for _ in ranking_rows(rec))
    except Exception as e:  # noqa: BLE001 -- any reason it does not load means: not usable yet
        return [], f"{type(e).__name__}: {str(e)[:200]}"
    if n == 0:
        return [], "the files hold no rankings"
    return [str(f) for f in files], ""


def synthetic_rankings(path: Path, k: int, seed: int) -> int:
    """Ranking JSONL from the bundled SFT demonstrations: for each demonstration, its own reply
    and k-1 other demonstrations' replies (seeded choice), ranked in that order. Returns rows."""
    from loopchat.data.formats import read_file, sft_messages
    from loopchat.train.sft import data_files

    convs = [m for f in data_files([]) for rec in read_file(f) for m in sft_messages(rec)]
    if len(convs) < k:
        raise ValueError(f"need at least {k} demonstrations for K = {k}, found {len(convs)}")
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i, msgs in enumerate(convs):
            others = [j if j < i else j + 1 for j in rng.sample(range(len(convs) - 1), k - 1)]
            row = {"prompt": msgs[:-1], "responses": [msgs[-1]["content"]] + [convs[j][-1]["content"] for j in others],
                   "ranks": list(range(k)), "split": "train", "category": "synthetic"}
            f.write(json.dumps(row) + "\n")
    return len(convs)


def k_label(ks: list[int]) -> str:
    return str(ks[0]) if len(ks) == 1 else f"{ks[0]}-{ks[-1]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--model", default="default", help="model spec for all trainers (CPU; CUDA uses a random ~1B Llama)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random Llama with the real tokenizer (smoke runs)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 timed steps, max-seq-len 512, 2 rankings x 2 micro-steps")
    ap.add_argument("--steps", type=int, help="timed optimizer steps after the warm-up step (default 4 CPU, 20 CUDA, 2 quick)")
    ap.add_argument("--max-seq-len", type=int, help="longest prompt + reply (default 768 = RMConfig's; 512 with --quick)")
    ap.add_argument("--batch-size", type=int, help="rankings per optimizer step of the K-way run (default 4 CPU, 32 CUDA, 2 quick; RMConfig's is 8); "
                    "the flat runs get the same pairs")
    ap.add_argument("--grad-accum", type=int, help="micro-steps per optimizer step (default 2 = RMConfig's)")
    ap.add_argument("--data-source", default="auto", choices=["auto", "bundled", "synthetic"],
                    help="auto: the bundled comparisons if they load as rankings, else synthetic rankings from the demonstrations")
    ap.add_argument("--data", action="append", default=[], help="ranking / preference files or folders instead (repeat the flag)")
    ap.add_argument("--k", type=int, default=4, help="replies per synthetic ranking (default 4)")
    ap.add_argument("--trl-input", default="conversational", choices=["conversational", "ids"],
                    help="what TRL gets: messages it tokenises with the chat template (default), or loopchat's token ids")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "2")), help="torch threads (default 2)")
    ap.add_argument("--variants", nargs="+", choices=ALL_VARIANTS, default=ALL_VARIANTS)
    ap.add_argument("--out", help="JSON path (default benchmarks/results/rm-<device>.json; --tiny: rm-<device>-tiny.json)")
    ap.add_argument("--child", nargs=2, metavar=("VARIANT", "ARGS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        variant, a = args.child
        print(json.dumps(child(variant, json.loads(a))))
        return

    cpu = args.device == "cpu"
    q = args.quick
    if args.k < 2:
        ap.error("--k must be at least 2")
    from loopchat.models import native_bf16

    # bf16 autocast for every variant where the hardware runs it natively (emulated bf16 is >10x slower)
    a = {
        "device": args.device, "bf16": native_bf16(args.device), "model": args.model, "threads": args.threads, "seed": 0, "lr": 2e-5,
        "steps": args.steps or (2 if q else 4 if cpu else 20),
        "max_seq_len": args.max_seq_len or (512 if q else 768),
        "batch_size": args.batch_size or (2 if q else 4 if cpu else 32),
        "grad_accum": args.grad_accum or 2,
        "trl_input": args.trl_input,
    }
    if a["batch_size"] % a["grad_accum"]:
        ap.error("--batch-size must be a multiple of --grad-accum")
    tmp = Path(tempfile.mkdtemp(prefix="bench-rm-"))
    try:
        if args.data:
            a["data"], data_label = args.data, "your files: " + ", ".join(args.data)
        else:
            files, why = ([], "") if args.data_source == "synthetic" else bundled_comparisons()
            if args.data_source == "bundled" and not files:
                ap.error(f"the bundled comparison set does not load: {why}")
            if files:
                a["data"], data_label = files, "bundled comparisons (" + ", ".join(Path(f).name for f in files) + ")"
            else:
                if why:
                    eprint(f"bundled comparisons not usable ({why}); using synthetic rankings from the demonstrations")
                n = synthetic_rankings(tmp / f"synthetic-k{args.k}.jsonl", args.k, seed=0)
                a["data"] = [str(tmp / f"synthetic-k{args.k}.jsonl")]
                data_label = f"synthetic: {n} bundled demonstrations, each ranked above {args.k - 1} other demonstrations' replies (K = {args.k})"
        a["data_label"] = data_label
        if args.tiny and cpu:
            a["model"] = make_model(tmp / "tiny")
        label = "tiny random Llama (2 layers, d=64)" if args.tiny else (a["model"] if cpu else "random Llama-3.2-1B-shaped (UNTESTED path)")
        eprint(f"model: {label}; data: {data_label}\n{a['steps']} timed steps after 1 warm-up; max_seq_len {a['max_seq_len']}; "
               f"K-way {a['batch_size']} rankings x {a['grad_accum']} micro-steps per step; {a['threads']} threads")
        rows = []
        for v in args.variants:
            t0 = time.perf_counter()
            r = in_subprocess(__file__, v, a)
            rows.append(r)
            if not r.get("failed"):
                eprint(f"  {v:14s} {r['pairs_per_s']:8.2f} pairs/s  {r['tokens_per_s']:9.1f} real tok/s  "
                       f"{r['seconds_per_step']:7.2f} s/step  ({time.perf_counter() - t0:.0f} s incl. load)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    env = versions(trl=True)
    print(f"\n{environment_line(cpu, a['threads'], env)}; model: {label}")
    print(f"data: {data_label}; max_seq_len {a['max_seq_len']}; {a['grad_accum']} micro-steps per optimizer step\n")
    ok = [r for r in rows if not r.get("failed")]
    base = next((r["pairs_per_s"] for r in ok if r["variant"] == "trl"), None)
    mfu = not cpu
    print("| variant | batch element | steps | pairs/step | fwd rows/pair | real tokens/pair | padding | s/step | pairs/s | "
          "vs trl (pairs/s) | real tokens/s | peak MiB | final loss |" + (" MFU |" if mfu else ""))
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if mfu else ""))
    for r in rows:
        if r.get("failed"):
            print(f"| {r['variant']} | failed: {r['error'].splitlines()[-1][:120] if r['error'] else '?'} |")
            continue
        elem = f"ranking (K={k_label(r['K'])})" if r["variant"] == "loopchat" else "pair"
        sp = f"{r['pairs_per_s'] / base:.2f}x" if base else "-"
        print(f"| {r['variant']} | {elem} | {r['steps_timed']} | {r['pairs_per_step']:.1f} | {r['rows_per_pair']:.2f} | "
              f"{r['real_tokens_per_pair']:.0f} | {100 * r['padding_fraction']:.1f}% | {r['seconds_per_step']:.2f} | "
              f"{r['pairs_per_s']:.2f} | {sp} | {r['tokens_per_s']:.1f} | {r['peak_mem_mib']:.0f} | {r['final_loss']:.4f} |"
              + (f" {100 * r['mfu']:.1f}% |" if mfu else ""))
    print()
    kw = next((r for r in ok if r["variant"] == "loopchat"), None)
    if kw:
        ks = kw["K"]
        per = ", ".join(f"K={k}: {k} rows vs {k * (k - 1)} ({k - 1:.0f}x fewer)" for k in ks)
        print(f"Forward-pass saving: a ranking of K replies has C(K,2) pairs; loopchat forwards its K replies once, a flat "
              f"pairwise loader (loopchat-flat, trl) forwards 2 rows per pair: {per}. Measured forward rows per pair: "
              + ", ".join(f"{r['variant']} {r['rows_per_pair']:.2f}" for r in ok) + ".")
        if base:
            s = kw["pairs_per_s"] / base
            print(f"Target loopchat >= 1.5x trl in pairs/s: {'met' if s >= 1.5 else 'NOT met'} ({s:.2f}x).")
    print()
    for r in ok:
        print(f"- {r['variant']}: autocast={r.get('autocast')} ({r.get('compute_dtype')}), {r['optimizer']}, "
              f"{r['rows_per_step']:.0f} rows / {r['real_tokens_per_step']:.0f} real tokens per step, "
              f"max row length {r['max_attention_len']}" + "".join(f"; {n}" for n in r["notes"]))
    if kw:
        ds = kw["data_summary"]
        print(f"- data: {ds['train_rankings']} training rankings ({ds['train_pairs']} pairs, K {ds['K']}), "
              f"{sum(ds['skipped'].values())} skipped {ds['skipped'] or ''}; flat/trl pairs per step {kw['pairs_per_step_plan']}"
              + ("" if kw["fixed_k"] else f" (mixed K: the K-way steps hold {kw['kway_pairs_per_step']} pairs, warm-up first; "
                 "so the flat runs' steps cover the same pair list but not step by step the same pairs)"))
    out = Path(args.out) if args.out else HERE / "results" / f"rm-{args.device}{'-tiny' if args.tiny else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": {**a, "model_label": label, **env},
                               "results": rows}, indent=1) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
