"""The training loop shared by SFT, the reward model and PPO.

One `Trainer` owns everything a run needs besides its loss: accelerate (one process, or DDP
over gloo on CPU / NCCL on GPU via `accelerate launch`), AdamW with linear warmup + cosine
decay, gradient accumulation, bf16 autocast, LoRA, the run folder (config.yaml,
metrics.jsonl, PNG curves, Hugging Face checkpoints) and crash-safe resumable state.

    trainer = Trainer(cfg, model, tok, kind="sft")
    trainer.fit(train_items, eval_items, collate, loss_fn)

`fit` drives a plain supervised loop. PPO drives its own outer loop (rollouts, then
optimisation epochs) and calls the same pieces directly: `setup(total_steps)`,
`backward`, `optimizer_step`, `log`, `save`, `finish`, `progress`.

Batches. `batch_size` counts *items per optimizer step, summed over all processes* (an
item is what `collate` takes: a packed row of tokens for SFT, a ranking for the reward
model). `grad_accum` is fixed; with more processes the per-process micro-batch shrinks:
micro = batch_size / (grad_accum * num_processes), which must divide exactly. So the
effective batch, the data order and (up to float rounding) the result do not depend on how
many processes run it.

Loss normalisation. `loss_fn(model, batch) -> (loss_sum, n_units, metrics)` returns the
SUM of the loss over its `n_units` (labelled tokens for SFT, pairs for the reward model),
and `collate` must put the same count in `batch["num_units"]`. The trainer counts the units
of the whole optimizer step (all micro-batches, all processes) before the first backward,
so the gradient is exactly that of the mean over the effective batch however it is split.
(Averaging per-micro-batch means instead would weight a short conversation's tokens more.)
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from pydantic import Field

from loopchat import paths
from loopchat.config import Config, ConfigError, dump_config

LossFn = Callable[[torch.nn.Module, dict], "tuple[torch.Tensor, int | torch.Tensor, dict[str, float]]"]

# Settings that may differ when resuming: they don't change what is computed. Gradient
# checkpointing recomputes activations instead of keeping them, so a run that grew short of
# memory can resume with it on.
RESUME_MAY_CHANGE = {"resume", "out", "eval_every", "save_every", "log_every", "save_total_limit", "gradient_checkpointing"}


class TrainConfig(Config):
    model: str = Field("default", description="model to start from: 'default', a checkpoint folder, a .gguf file or a Hub id")
    data: list[str] = Field(default_factory=list, description="dataset files or folders of *.jsonl (repeat the flag); empty = the bundled set for this stage")
    out: str | None = Field(None, description="run folder; default $LOOPCHAT_HOME/runs/<kind>-<timestamp> (with --resume: the latest run of this kind)")
    lr: float | None = Field(None, description="peak learning rate; default 2e-5 for full fine-tuning, 2e-4 with LoRA")
    weight_decay: float = Field(0.0, description="AdamW weight decay (applied to matrices only, not to norms/biases)")
    warmup_ratio: float = Field(0.05, ge=0, le=1, description="fraction of the steps spent in linear warmup before cosine decay")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decays to this fraction of the peak learning rate")
    max_grad_norm: float = Field(1.0, ge=0, description="clip the gradient norm to this (0 = no clipping)")
    epochs: float = Field(3, gt=0, description="passes over the training data (may be fractional)")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps (caps epochs)")
    batch_size: int = Field(8, ge=1, description="items per optimizer step over all processes (SFT: packed rows of max-seq-len tokens)")
    grad_accum: int = Field(4, ge=1, description="micro-steps per optimizer step; per-process micro-batch = batch-size / (grad-accum x processes)")
    max_seq_len: int = Field(1024, ge=16, description="longest token sequence (SFT: the packed row length; longer conversations are skipped)")
    eval_fraction: float = Field(0.05, ge=0, lt=1, description="fraction of the data held out for evaluation (seeded split)")
    eval_every: int = Field(25, ge=0, description="evaluate every this many steps (0 = only at the start and the end)")
    save_every: int = Field(25, ge=0, description="write a checkpoint and resumable state every this many steps (0 = only at the end)")
    save_total_limit: int = Field(2, ge=0, description="keep only the newest this many checkpoint-<step> folders (0 = keep all)")
    log_every: int = Field(1, ge=1, description="append a line to metrics.jsonl every this many steps")
    seed: int = Field(0, description="seed for the data split, data order and initialisation")
    bf16: bool | None = Field(None, description="bf16 autocast for forward/backward (weights and optimizer stay fp32); default: on where bf16 is native (CUDA, CPUs with AMX / AVX512-BF16: ~2x faster), off elsewhere (emulated bf16 is >10x slower)")
    lora: bool = Field(False, description="train LoRA adapters instead of all weights; checkpoints are saved merged")
    lora_r: int = Field(16, ge=1, description="LoRA rank")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / r)")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout")
    lora_targets: list[str] = Field(default_factory=lambda: ["all-linear"], description="module names to adapt (repeat the flag); 'all-linear' = every linear layer but the output head")
    resume: bool = Field(False, description="continue the run in --out (or the latest run of this kind) from its last saved state")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward: less memory, about 30% slower")


# ----------------------------------------------------------------------------- small pieces


def _multi_cpu() -> bool:
    """Several processes and no CUDA: tell accelerate to run DDP on CPU (gloo)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def is_main_process() -> bool:
    """Usable before the Trainer exists (e.g. to print data summaries once). accelerate's
    process state is a singleton, so it must be created with the Trainer's settings."""
    from accelerate import PartialState

    return PartialState(cpu=_multi_cpu()).is_main_process


def runs_dir() -> Path:
    return paths.home() / "runs"


def latest_run(kind: str) -> Path | None:
    """The newest run folder of this kind that has resumable state."""
    cands = [p for p in runs_dir().glob(f"{kind}-*") if (p / "state").is_dir()]
    return max(cands, key=lambda p: p.stat().st_mtime) if cands else None


def jsonl_files(entries: list[str], default: Path, what: str) -> list[Path]:
    """Files to read: each entry a file or a folder of *.jsonl / *.jsonl.gz; none = `default`
    (a stage's bundled set). `what` names the data in the error."""
    paths = [Path(d).expanduser() for d in entries] or [default]
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted([*p.glob("*.jsonl"), *p.glob("*.jsonl.gz")])
            if not found:
                raise FileNotFoundError(f"{p}: folder has no *.jsonl files")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{what} not found: {p}")
    return files


def split_eval(items: Sequence, fraction: float, seed: int) -> tuple[list, list]:
    """Seeded train/eval split. At least one eval item when fraction > 0 and there are >= 2 items."""
    n = len(items)
    n_eval = 0 if fraction <= 0 or n < 2 else min(n - 1, max(1, round(n * fraction)))
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g).tolist()
    ev = set(perm[:n_eval])
    return [x for i, x in enumerate(items) if i not in ev], [x for i, x in enumerate(items) if i in ev]


def epoch_order(n: int, epoch: int, seed: int) -> list[int]:
    """The item order of one epoch: a permutation depending only on (seed, epoch), so a
    resumed run (or a run on more processes) sees exactly the same order."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def step_indices(n: int, batch_size: int, step: int, seed: int) -> tuple[int, list[int]]:
    """(epoch, item indices) of optimizer step `step` (0-based). An epoch has
    ceil(n / batch_size) steps; the last one wraps around to the start of the epoch's order,
    so every item is seen every epoch and every step has exactly batch_size items."""
    spe = math.ceil(n / batch_size)
    epoch, k = divmod(step, spe)
    order = epoch_order(n, epoch, seed)
    return epoch, [order[(k * batch_size + j) % n] for j in range(batch_size)]


def lr_lambda(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warmup from ~0 to 1, then cosine decay to min_ratio at `total`."""

    def f(step: int) -> float:  # step = optimizer steps taken so far
        if step < warmup:
            return (step + 1) / (warmup + 1)
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return f


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    # nanoGPT: decay matrices (embeddings, linears), not norms and biases.
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    # The fused kernel (CPU and CUDA) is one pass over all parameters; the default per-tensor
    # loop took ~20% of a 135M CPU step.
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16) for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused or None)


def apply_lora(model, cfg: TrainConfig):
    from peft import LoraConfig, get_peft_model

    targets: Any = cfg.lora_targets
    if targets == ["all-linear"]:
        targets = "all-linear"
    lc = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, lc)


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _publish_dir(tmp: Path, final: Path) -> None:
    """Make a fully written temp folder visible under its final name. A kill before this
    leaves only a .tmp-* folder, which readers ignore and the next save removes."""
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def save_hf_checkpoint(model, tokenizer, path: Path, info: dict | None = None) -> Path:
    """A Hugging Face folder (safetensors + tokenizer + chat template) that plain
    `AutoModelForCausalLM.from_pretrained` loads. A LoRA model is merged into a copy first:
    merging in place and unmerging would perturb the weights by rounding and break exact
    resume."""
    import copy

    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if hasattr(model, "merge_and_unload"):  # peft
        model = copy.deepcopy(model).merge_and_unload()
    use_cache = model.config.use_cache
    model.config.use_cache = True  # trained with it off for gradient checkpointing; inference wants it on
    try:
        model.save_pretrained(tmp, safe_serialization=True)
    finally:
        model.config.use_cache = use_cache
    tokenizer.save_pretrained(tmp)
    if info is not None:
        (tmp / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    _publish_dir(tmp, path)
    return path


class MetricsLog:
    """metrics.jsonl: one JSON object per line, appended and flushed as training goes."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def read(self) -> list[dict]:
        out = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a line cut short by a kill
        return out

    def append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> list[dict]:
        """On resume: drop lines logged after the saved state (they will be logged again)."""
        keep = [r for r in self.read() if r.get("step", 0) <= step]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in keep))
        return keep


def plot_metrics(records: list[dict], path: Path, panels: dict[str, list[str]] | None = None) -> Path:
    """One PNG with a panel per entry of `panels` ({title: [metric keys]}), x = step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = panels or {"loss": ["loss", "eval_loss"], "learning rate": ["lr"]}
    panels = {t: ks for t, ks in panels.items() if any(k in r for r in records for k in ks)}
    if not panels:
        return path
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 3 * len(panels)), squeeze=False)
    for ax, (title, keys) in zip(axes[:, 0], panels.items()):
        for k in keys:
            pts = [(r["step"], r[k]) for r in records if r.get(k) is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, markersize=3, label=k)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------- the trainer


def use_bf16(setting: bool | None, device) -> bool:
    """The bf16 setting as given, or where unset (None), whether this device runs bf16 natively."""
    from loopchat.models import native_bf16

    return setting if setting is not None else native_bf16(device)


class Trainer:
    """See the module docstring. Attributes after construction: accelerator, model (wrapped
    after setup), tokenizer, cfg, kind, run_dir, is_main, world, micro_batch."""

    plot_panels: dict[str, list[str]] = {"loss": ["loss", "eval_loss"], "learning rate": ["lr"]}

    def __init__(self, cfg: TrainConfig, model, tokenizer, kind: str):
        from accelerate import Accelerator
        from accelerate.utils import broadcast_object_list, set_seed

        # Mixed precision is our own explicit torch.autocast (see autocast()), so accelerate
        # runs in "no"; step_scheduler_with_optimizer=False because accelerate would otherwise
        # step the scheduler once per process per step.
        #
        # Several processes on a machine without CUDA: DDP over gloo on CPU. Launch with
        # `accelerate launch --multi_gpu --num_processes N` (torchrun underneath); note that
        # `accelerate launch --cpu --num_processes N` starts ONE process unless given an MPI
        # hostfile. Without cpu=True here, each process would think it runs alone.
        world_env = int(os.environ.get("WORLD_SIZE", "1"))
        self.accelerator = Accelerator(mixed_precision="no", step_scheduler_with_optimizer=False, cpu=_multi_cpu())
        acc = self.accelerator
        cfg = cfg.model_copy(deep=True)  # we fill in out and lr; the caller's config stays as given
        if acc.num_processes != world_env:
            raise RuntimeError(f"launched as {world_env} processes but accelerate sees {acc.num_processes}: check the launch command")
        self.is_main, self.world = acc.is_main_process, acc.num_processes
        self.cfg, self.tokenizer, self.kind = cfg, tokenizer, kind
        if cfg.batch_size % (cfg.grad_accum * self.world):
            raise ConfigError(
                f"batch_size {cfg.batch_size} must be a multiple of grad_accum {cfg.grad_accum} x {self.world} processes "
                "(the per-process micro-batch shrinks with more processes so the effective batch stays the same)"
            )
        self.micro_batch = cfg.batch_size // (cfg.grad_accum * self.world)
        if cfg.lr is None:
            cfg.lr = 2e-4 if cfg.lora else 2e-5
        self.base_spec = getattr(model, "loopchat_load_info", {}).get("spec", cfg.model)
        set_seed(cfg.seed)
        if cfg.gradient_checkpointing:
            # Non-reentrant checkpointing also works when the inputs need no grad (frozen
            # embeddings under LoRA). The method was renamed in transformers 5.2x.
            model.config.use_cache = False
            kw = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
        if cfg.lora:
            model = apply_lora(model, cfg)
        self.model = model

        # The run folder: every process must agree on it (a timestamp could differ).
        run: list = [None]
        if self.is_main:
            try:
                run[0] = str(self._choose_run_dir())
            except ConfigError as e:  # raise on every process, not only here (the others would hang)
                run[0] = e
        broadcast_object_list(run)
        if isinstance(run[0], Exception):
            raise run[0]
        self.run_dir = Path(run[0])
        cfg.out = str(self.run_dir)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        self.history: list[dict] = []
        self._check_resume_config()  # on every process: an error on one alone would hang the others
        acc.wait_for_everyone()
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.run_dir / "config.yaml")
        acc.wait_for_everyone()
        self.step = 0
        self.elapsed_before = 0.0  # training seconds of earlier sessions of this run
        self.extra_state: dict = {}  # PPO etc. may keep their own resumable counters here
        self._pbar = None

    # -- run folder

    def _choose_run_dir(self) -> Path:
        cfg = self.cfg
        if cfg.out:
            return Path(cfg.out).expanduser().resolve()
        if cfg.resume:
            latest = latest_run(self.kind)
            if latest is None:
                raise ConfigError(f"--resume: no run of kind {self.kind!r} with saved state under {runs_dir()}; give --out")
            return latest
        base = runs_dir() / f"{self.kind}-{time.strftime('%Y%m%d-%H%M%S')}"
        p, i = base, 1
        while p.exists():
            p, i = base.with_name(f"{base.name}-{i}"), i + 1
        return p

    def _check_resume_config(self) -> None:
        import yaml

        prev_path = self.run_dir / "config.yaml"
        if not prev_path.exists():
            return  # a new run (or a resume of a run that never started)
        if not self.cfg.resume:
            if (self.run_dir / "state").exists() or (self.run_dir / "final").exists():
                raise ConfigError(f"{self.run_dir} already holds a run; pass --resume to continue it or choose another --out")
            return
        prev = yaml.safe_load(prev_path.read_text()) or {}
        now = json.loads(self.cfg.model_dump_json())
        diff = [k for k in now if k not in RESUME_MAY_CHANGE and prev.get(k) != now[k]]
        if diff:
            detail = ", ".join(f"{k}: {prev.get(k)!r} -> {now[k]!r}" for k in diff)
            raise ConfigError(f"--resume with different settings than {prev_path} ({detail}); the data order and results would differ")

    # -- mixed precision

    @property
    def bf16(self) -> bool:
        return use_bf16(self.cfg.bf16, self.accelerator.device)

    def autocast(self):
        if not self.bf16:
            return nullcontext()
        return torch.autocast(device_type=self.accelerator.device.type, dtype=torch.bfloat16)

    # -- setup / state

    def setup(self, total_steps: int) -> int:
        """Optimizer, schedule, accelerate.prepare; load the saved state if resuming.
        Returns the step to continue from (0 for a fresh run)."""
        cfg, acc = self.cfg, self.accelerator
        self.total_steps = total_steps
        self.optimizer = build_optimizer(self.model, cfg.lr, cfg.weight_decay)
        warmup = round(cfg.warmup_ratio * total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(warmup, total_steps, cfg.min_lr_ratio))
        self.model, self.optimizer, self.scheduler = acc.prepare(self.model, self.optimizer, self.scheduler)
        self.model.train()
        self.t_start = time.perf_counter()
        if cfg.resume:
            info = self.load_state()
            if info is not None:
                self.step = info["step"]
                self.elapsed_before = info.get("elapsed", 0.0)
                self.extra_state = info.get("extra", {})
                if self.is_main:
                    print(f"[{self.kind}] resumed {self.run_dir} at step {self.step}/{total_steps}", flush=True)
        if self.is_main:
            self.history = self.metrics.truncate_after(self.step) if self.step else []
            if not self.step and self.metrics.path.exists():
                self.metrics.path.unlink()
        return self.step

    def state_info(self) -> dict:
        return {
            "step": self.step, "total_steps": self.total_steps, "elapsed": self.elapsed(),
            "world": self.world, "extra": self.extra_state,
        }

    def save_state(self, info: dict | None = None) -> Path:
        """Resumable state in state/step-<N>/ (accelerate: weights, optimizer, scheduler, the
        RNG of every process; plus trainer_state.json), published by a rename and pointed to by
        state/latest, also replaced atomically: a kill at any moment leaves the previous
        state intact."""
        acc = self.accelerator
        root = self.run_dir / "state"
        name = f"step-{self.step:07d}"
        tmp = root / f".tmp-{name}"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if self.is_main:
            (tmp / "trainer_state.json").write_text(json.dumps(info or self.state_info(), indent=2) + "\n")
            _publish_dir(tmp, root / name)
            write_text_atomic(root / "latest", name + "\n")
            for old in root.iterdir():  # older states and leftovers of killed saves
                if old.name not in (name, "latest"):
                    shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        acc.wait_for_everyone()
        return root / name

    def latest_state_dir(self) -> Path | None:
        root = self.run_dir / "state"
        if not root.is_dir():
            return None
        latest = root / "latest"
        if latest.exists():
            d = root / latest.read_text().strip()
            if (d / "trainer_state.json").exists():
                return d
        done = sorted(d for d in root.glob("step-*") if (d / "trainer_state.json").exists())
        return done[-1] if done else None

    def load_state(self) -> dict | None:
        d = self.latest_state_dir()
        if d is None:
            return None
        info = json.loads((d / "trainer_state.json").read_text())
        if info.get("total_steps") not in (None, self.total_steps):
            raise ConfigError(f"{d}: saved run had {info['total_steps']} steps, this one {self.total_steps}: different data or settings")
        self.accelerator.load_state(str(d))
        return info

    # -- one optimizer step, for callers that drive their own loop (PPO)

    def backward(self, loss: torch.Tensor, sync: bool = True) -> None:
        """Backward; with sync=False (all but the last micro-step) DDP skips the all-reduce."""
        ctx = nullcontext() if sync or self.world == 1 else self.accelerator.no_sync(self.model)
        with ctx:
            self.accelerator.backward(loss)

    def optimizer_step(self) -> float | None:
        """Clip, step, schedule, zero. Returns the gradient norm (before clipping)."""
        gn = None
        if self.cfg.max_grad_norm:
            gn = float(self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return gn

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t_start

    def all_sum(self, values: list[float]) -> list[float]:
        """Sum a few numbers over processes (float64, so token counts stay exact)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
        if self.world > 1:
            t = self.accelerator.reduce(t, reduction="sum")
        return t.tolist()

    # -- logging, plots, checkpoints

    def progress(self, total: int, initial: int = 0):
        from tqdm.auto import tqdm

        self._pbar = tqdm(total=total, initial=initial, desc=self.kind, unit="step", disable=not self.is_main, dynamic_ncols=True)
        return self._pbar

    def log(self, record: dict) -> None:
        """Append to metrics.jsonl (main process) and show it on the progress bar."""
        record = {"step": self.step, **record}
        self.history.append(record)
        if self.is_main:
            self.metrics.append(record)
            if self._pbar is not None:
                show = {k: record[k] for k in ("loss", "eval_loss", "tokens_per_s") if record.get(k) is not None}
                self._pbar.set_postfix({k: f"{v:.4g}" for k, v in show.items()}, refresh=False)

    def plot(self) -> None:
        if self.is_main:
            plot_metrics(self.history, self.run_dir / "curves.png", self.plot_panels)

    def checkpoint_info(self) -> dict:
        return {"kind": self.kind, "step": self.step, "base_model": self.base_spec, "run": str(self.run_dir)}

    def export_model(self):
        """The Hugging Face model that checkpoints hold (a subclass that wraps it says which)."""
        return self.accelerator.unwrap_model(self.model)

    def save_checkpoint(self, name: str) -> Path:
        path = self.run_dir / name
        if self.is_main:
            save_hf_checkpoint(self.export_model(), self.tokenizer, path, self.checkpoint_info())
            self.prune_checkpoints(name)
        self.accelerator.wait_for_everyone()
        return path

    def prune_checkpoints(self, name: str) -> None:
        """After writing `name`: keep only the newest save_total_limit checkpoint-<step> folders."""
        if name.startswith("checkpoint-") and self.cfg.save_total_limit:
            ckpts = sorted(self.run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
            for old in ckpts[: -self.cfg.save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)

    def save(self) -> None:
        """checkpoint-<step>/ + state/ + plots."""
        self.save_checkpoint(f"checkpoint-{self.step}")
        self.save_state()
        self.plot()

    def finish(self) -> Path:
        """final/ + state (so --resume of a finished run is a no-op) + plots. Returns final/."""
        if self._pbar is not None:
            self._pbar.close()
        self.save_state()
        path = self.save_checkpoint("final")
        self.plot()
        return path

    # -- the supervised loop

    def _units(self, batch: dict, items: list) -> int:
        return int(batch.get("num_units", len(items)))

    @torch.no_grad()
    def evaluate(self, eval_items: Sequence, collate: Callable, loss_fn: LossFn) -> dict:
        """Mean loss (and metrics) over the eval set, sharded over processes."""
        was_training = self.model.training
        self.model.eval()
        mine = list(eval_items)[self.accelerator.process_index :: self.world]
        sums: dict[str, float] = {}
        loss_sum, units = 0.0, 0.0
        for i in range(0, len(mine), self.micro_batch):
            batch = to_device(collate(mine[i : i + self.micro_batch]), self.accelerator.device)
            with self.autocast():
                loss, n, metrics = loss_fn(self.model, batch)
            n = float(n)
            loss_sum += float(loss)
            units += n
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) * n
        keys = sorted(sums)
        tot = self.all_sum([loss_sum, units] + [sums[k] for k in keys])
        self.model.train(was_training)
        if tot[1] == 0:
            return {}
        out = {"eval_loss": tot[0] / tot[1]}
        out.update({f"eval_{k}": v / tot[1] for k, v in zip(keys, tot[2:])})
        return out

    def fit(self, train_items: Sequence, eval_items: Sequence, collate: Callable[[list], dict], loss_fn: LossFn) -> Path:
        """Train on `train_items` for cfg.epochs (or max_steps). Returns the final/ checkpoint."""
        cfg, acc = self.cfg, self.accelerator
        n = len(train_items)
        if n == 0:
            raise ValueError(f"[{self.kind}] no training items")
        steps_per_epoch = math.ceil(n / cfg.batch_size)
        total = math.ceil(cfg.epochs * steps_per_epoch)
        if cfg.max_steps:
            total = min(total, cfg.max_steps)
        start = self.setup(total)
        rank, W, mb = acc.process_index, self.world, self.micro_batch
        pbar = self.progress(total, start)
        if start == 0 and len(eval_items):
            self.log(self.evaluate(eval_items, collate, loss_fn))
        acc_loss = acc_units = acc_tokens = 0.0
        acc_metrics: dict[str, float] = {}
        t_log = time.perf_counter()
        while self.step < total:
            _, idx = step_indices(n, cfg.batch_size, self.step, cfg.seed)
            # Micro-step m of process r takes slice (m*W + r); any fixed split works because
            # the loss is normalised by the units of the whole step.
            batches = []
            for m in range(cfg.grad_accum):
                j = (m * W + rank) * mb
                items = [train_items[i] for i in idx[j : j + mb]]
                batch = collate(items)
                batches.append((batch, self._units(batch, items), int(batch.get("num_tokens", 0))))
            step_units, step_tokens = self.all_sum([sum(b[1] for b in batches), sum(b[2] for b in batches)])
            if step_units == 0:
                raise ValueError(f"[{self.kind}] step {self.step}: a batch with nothing to learn (num_units = 0)")
            loss_sum = 0.0
            for m, (batch, units, _) in enumerate(batches):
                batch = to_device(batch, acc.device)
                with self.autocast():
                    loss, n_units, metrics = loss_fn(self.model, batch)
                if int(n_units) != units:
                    raise ValueError(f"[{self.kind}] loss_fn counted {int(n_units)} units, collate said num_units={units}")
                # x W: DDP averages gradients over processes; we want the global sum / units.
                self.backward(loss * (W / step_units), sync=m == cfg.grad_accum - 1)
                loss_sum += float(loss.detach())
                for k, v in metrics.items():
                    acc_metrics[k] = acc_metrics.get(k, 0.0) + float(v) * units
            lr = self.lr()
            grad_norm = self.optimizer_step()
            (g_loss,) = self.all_sum([loss_sum])
            acc_loss, acc_units, acc_tokens = acc_loss + g_loss, acc_units + step_units, acc_tokens + step_tokens
            pbar.update(1)

            last = self.step == total
            do_eval = len(eval_items) > 0 and (last or (cfg.eval_every and self.step % cfg.eval_every == 0))
            do_save = not last and cfg.save_every and self.step % cfg.save_every == 0
            logged = do_eval or do_save or last or self.step % cfg.log_every == 0
            if logged:
                now = time.perf_counter()
                keys = sorted(acc_metrics)
                m_tot = self.all_sum([acc_metrics[k] for k in keys]) if keys else []
                rec = {
                    "epoch": round(self.step / steps_per_epoch, 4),
                    "loss": acc_loss / acc_units,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens_per_s": acc_tokens / max(now - t_log, 1e-9),
                    "elapsed": round(self.elapsed(), 3),
                    **{k: v / acc_units for k, v in zip(keys, m_tot)},
                }
                if do_eval:
                    rec.update(self.evaluate(eval_items, collate, loss_fn))
                self.log(rec)
                acc_loss = acc_units = acc_tokens = 0.0
                acc_metrics = {}
            if do_save:
                self.save()
            if logged:  # tokens/s counts training only, not evaluation or saving
                t_log = time.perf_counter()
        return self.finish()
