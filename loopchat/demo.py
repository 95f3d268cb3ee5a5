"""`loopchat demo`: the whole recipe on a laptop CPU, end to end, in one command.

    embedded model ──SFT──► sft ──(backbone)──► reward model ──PPO──► ppo
         │                   │                                        │
         └───────────── behaviour evaluation, side by side ───────────┘

Each stage is the real trainer (`train sft`, `train rm`, `train ppo`, `eval behaviours`) with
a budget small enough for 2 CPU cores: a fixed number of optimizer steps / PPO iterations and
a per-category sample of the evaluation. It writes one folder:

    <out>/sft/  <out>/rm/  <out>/ppo/     the runs (Hugging Face checkpoints in final/)
    <out>/eval/                           results JSON per model
    <out>/report.html                     three columns (embedded | SFT | PPO) + training curves

Interrupted? Run the same command again: a finished stage is kept, an unfinished one resumes
from its last saved state. The numbers of a demo are those of a short run; the full recipe
(README, "Training") trains longer.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pydantic import Field

from loopchat.config import Config


class DemoConfig(Config):
    model: str = Field("default", description="model to start from")
    out: str = Field("runs/demo", description="folder for the three runs, the evaluation and report.html")
    # The defaults fit ~15 minutes on 2 CPU cores without native bf16 (an AVX2-only EPYC, fp32
    # training at ~70 tok/s); a CPU with AMX / AVX512-BF16 runs them ~3x faster.
    sft_steps: int = Field(6, ge=1, description="SFT optimizer steps (packed rows of max-seq-len tokens)")
    sft_batch_size: int = Field(4, ge=1, description="SFT packed rows per step")
    sft_lr: float = Field(2e-4, gt=0, description="SFT peak learning rate")
    max_seq_len: int = Field(512, ge=64, description="SFT packed row length")
    rm_steps: int = Field(6, ge=1, description="reward-model optimizer steps")
    rm_batch_size: int = Field(2, ge=1, description="rankings (K replies each) per reward-model step")
    rm_lr: float = Field(5e-5, gt=0, description="reward-model learning rate")
    rm_offset_samples: int = Field(16, ge=1, description="SFT demonstrations scored for the reward model's normalisation offset")
    ppo_iterations: int = Field(2, ge=1, description="PPO iterations (rollouts + updates)")
    rollout_batch: int = Field(8, ge=1, description="PPO prompts per iteration")
    ppo_batch_size: int = Field(8, ge=1, description="PPO rollouts per optimizer step")
    ppo_lr: float = Field(1e-5, gt=0, description="PPO learning rate")
    max_new_tokens: int = Field(64, ge=8, description="reply budget in PPO rollouts and the evaluation")
    eval_per_category: int = Field(3, ge=1, description="behaviour-eval items per category")
    threads: int | None = Field(None, description="torch threads (default: torch's choice)")
    seed: int = Field(0, description="seed of every stage")


def _done(run: Path) -> bool:
    return (run / "final" / "config.json").exists()


def _stage(name: str, n: int, total: int) -> float:
    print(f"\n=== [{n}/{total}] {name} ===", flush=True)
    return time.perf_counter()


def run_demo(cfg: DemoConfig) -> Path:
    import torch

    from loopchat.evaluate import report, rubric
    from loopchat.evaluate.behaviours import BehavioursConfig, evaluate_model, results_path, select_items
    from loopchat.train.ppo import PPOConfig, run_ppo
    from loopchat.train.reward import RMConfig, run_rm
    from loopchat.train.sft import SFTConfig, run_sft

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    t_all = time.perf_counter()
    common = {"seed": cfg.seed, "save_every": 0, "eval_every": 0}

    t = _stage("SFT on the bundled demonstrations", 1, 4)
    sft = out / "sft"
    if not _done(sft):
        run_sft(SFTConfig(model=cfg.model, out=str(sft), lr=cfg.sft_lr, max_steps=cfg.sft_steps, batch_size=cfg.sft_batch_size,
                          grad_accum=min(4, cfg.sft_batch_size), max_seq_len=cfg.max_seq_len, resume=sft.exists(), **common))
    times["sft"] = time.perf_counter() - t

    t = _stage("reward model on the bundled rankings", 2, 4)
    rmr = out / "rm"
    if not _done(rmr):
        run_rm(RMConfig(model=str(sft / "final"), out=str(rmr), lr=cfg.rm_lr, max_steps=cfg.rm_steps, batch_size=cfg.rm_batch_size,
                        grad_accum=min(2, cfg.rm_batch_size), offset_samples=cfg.rm_offset_samples, resume=rmr.exists(), **common))
    times["rm"] = time.perf_counter() - t

    t = _stage("PPO against the reward model", 3, 4)
    ppo = out / "ppo"
    if not _done(ppo):
        run_ppo(PPOConfig(model=str(sft / "final"), reward=str(rmr), out=str(ppo), lr=cfg.ppo_lr, iterations=cfg.ppo_iterations,
                          rollout_batch=cfg.rollout_batch, batch_size=cfg.ppo_batch_size, grad_accum=min(2, cfg.ppo_batch_size),
                          ppo_epochs=1, max_new_tokens=cfg.max_new_tokens, store=False, resume=ppo.exists(), **common))
    times["ppo"] = time.perf_counter() - t

    t = _stage("behaviour evaluation: embedded | SFT | PPO", 4, 4)
    items = select_items(BehavioursConfig(category=sorted({it["category"] for it in rubric.load_items()}), limit=cfg.eval_per_category))
    ev = out / "eval"
    ev.mkdir(exist_ok=True)
    runs: dict[str, dict] = {}
    for label, spec in (("embedded", cfg.model), ("SFT", str(sft / "final")), ("PPO", str(ppo / "final"))):
        path = results_path(ev, label)
        data = json.loads(path.read_text()) if path.exists() else evaluate_model(spec, items, cfg.max_new_tokens)
        path.write_text(json.dumps(data, ensure_ascii=False, indent=1))
        runs[label] = data
    summaries = {label: d["summary"] for label, d in runs.items()}
    print(rubric.format_table(summaries))
    times["eval"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t_all
    curves = [p for p in (sft / "curves.png", rmr / "curves.png", ppo / "curves.png") if p.exists()]
    html = report.write_html(out / "report.html", {label: d["results"] for label, d in runs.items()},
                             title="loopchat demo: embedded model | SFT | PPO", images=curves)
    (out / "timings.json").write_text(json.dumps({k: round(v, 1) for k, v in times.items()}, indent=2) + "\n")
    print("\n" + "  ".join(f"{k} {v / 60:.1f} min" for k, v in times.items()))
    print(f"report: {html}\nruns:   {sft}  {rmr}  {ppo}")
    return html
