"""What the training benchmarks (sft.py, rm.py, ppo.py) share: timing and memory on either
device, the autocast probe, the 6*N flop count and MFU, a random tiny checkpoint, and the
child-process runner that gives every variant a fresh process (clean peak memory, its own
thread count). Imported by the scripts as `harness` (they run with benchmarks/ on sys.path)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

H100_BF16_PEAK = 989e12  # dense bf16 TFLOP/s of an H100 SXM


def eprint(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def versions(trl: bool = False) -> dict:
    """The library versions the numbers depend on (written beside every results table)."""
    import importlib.metadata

    import torch
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__}
    if trl:
        try:
            out["trl"] = importlib.metadata.version("trl")
        except importlib.metadata.PackageNotFoundError:
            out["trl"] = "not installed"
    return out


def environment_line(cpu: bool, threads: int, vers: dict) -> str:
    """The table's first line: the device, then `versions()`."""
    import platform

    import torch

    device = (f"cpu ({platform.processor() or platform.machine()}, {threads} threads)" if cpu
              else (torch.cuda.get_device_name() if torch.cuda.is_available() else "cuda"))
    return f"device: {device}, " + ", ".join(f"{k} {v}" for k, v in vers.items())


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def peak_mem(device: str) -> float:
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux


def autocast_probe(model, device: str, seen: dict, skip: str = "lm_head"):
    """Record, on the first training forward, whether a linear layer (not the head named
    `skip`) runs under autocast and in which dtype its output comes out."""
    import torch

    lin = next(m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and skip not in n)

    def hook(mod, inp, out):
        if "autocast" not in seen and mod.training:
            seen["autocast"] = torch.is_autocast_enabled(device)
            seen["compute_dtype"] = str(out.dtype).replace("torch.", "")

    return lin.register_forward_hook(hook)


def matmul_params(model) -> int:
    """Parameters that take part in matmuls (every nn.Linear, the head included even when tied;
    not the embedding lookup) -- the N of 6*N flops per token."""
    import torch

    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def add_mfu(r: dict) -> dict:
    """Model flops per step: 6*N per real token + attention 12*layers*d_model*n^2 per row of n
    tokens (PaLM's convention, no causal discount; padding and cross-sequence masked work are
    not counted as useful), as TFLOP/s and as a fraction of the H100's bf16 peak."""
    n = r["steps_timed"]
    flops = 6 * r["n_matmul_params"] * r["real_tokens_per_step"] * n + 12 * r["n_layers"] * r["d_model"] * r["sumsq_per_step"] * n
    r["model_tflops_per_s"] = flops / r["seconds"] / 1e12
    r["mfu"] = flops / r["seconds"] / H100_BF16_PEAK
    return r


def make_model(path: Path, shape: dict | None = None, bf16: bool = False, tokenizer: str | None = None) -> str:
    """A randomly initialised Llama with the embedded model's real tokenizer (as in
    tests/conftest.py's make_tiny_checkpoint), saved as a normal checkpoint folder. Default
    shape: 2 layers of width 64. load_reward_model gives it a zero score head. `tokenizer`: a
    folder holding that tokenizer, for machines without the embedded model (a GPU box)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from loopchat import models

    shape = shape or dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=2048)
    tok = models.load_tokenizer(tokenizer or models.resolve_spec("default").path)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.bos_token_id, **shape)
    hf_logging.disable_progress_bar()
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    if bf16:
        model = model.to(torch.bfloat16)  # half the file; the trainers load it back as fp32 master weights
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def in_subprocess(script: str, variant: str, a: dict) -> dict:
    """Run `script --child VARIANT ARGS_JSON` in a fresh process; its last JSON line is the result."""
    env = {**os.environ, "OMP_NUM_THREADS": str(a["threads"]), "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1",
           "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, script, "--child", variant, json.dumps(a)], capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("{"):
            return json.loads(line)
    err = proc.stderr.strip().splitlines()
    eprint(f"  {variant}: FAILED (exit {proc.returncode}):\n    " + "\n    ".join(err[-15:]))
    return {"variant": variant, "failed": True, "error": "\n".join(err[-5:])}
