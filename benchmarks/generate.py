"""Generation speed, side by side, in one run: plain `transformers.generate` vs loopchat's
Generator (transformers backend and the fast decoder, fp32 and bf16) vs llama.cpp.

    python benchmarks/generate.py                 # CPU, the embedded SmolLM2-135M-Instruct
    python benchmarks/generate.py --quick         # fewer tokens / batch sizes (smoke run)
    python benchmarks/generate.py --device cuda   # GPU: a ~1.2B Llama-shaped model, random weights, bf16

Each variant runs in its own subprocess so its peak memory (max RSS, or peak CUDA memory)
is its own. Single-stream: greedy, a fixed number of new tokens (EOS ignored), after a
warm-up. Batched: sampling at temperature 1, B prompts x 64 new tokens; tokens/s counts all
rows. Prints a markdown table and writes benchmarks/results/generate-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPT = [{"role": "user", "content": "Explain in a few short sentences why the sky is blue during the day."}]
BATCH_PROMPTS = [
    "Write a short poem about autumn.", "What is 17 times 23?", "Give me three tips for sleeping better.",
    "Explain what a hash table is.", "Translate 'good morning' into French.", "Summarise the plot of Hamlet in two sentences.",
    "How do I reverse a list in Python?", "Name a few planets in our solar system.",
]


def load(device: str):
    import torch

    from loopchat import models

    if device == "cpu":
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
        return models.load("default")
    # GPU: a Llama-3.2-1B-shaped model with random weights (no download), the embedded tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tok = models.load("default", device="cpu")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096, tie_word_embeddings=True,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    return model, tok


def peak_mem(device: str) -> float:
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def run_variant(variant: str, device: str, batch: int, new_tokens: int) -> dict:
    """One measurement in this (fresh) process."""
    import torch

    from loopchat.generate import Generator, SamplingParams
    from loopchat.models import apply_chat_template

    model, tok = load(device)
    prompts = [PROMPT] if batch == 1 and variant != "batched" else [[{"role": "user", "content": BATCH_PROMPTS[i % len(BATCH_PROMPTS)]}] for i in range(batch)]
    greedy = batch == 1
    if variant.startswith("hf-generate"):
        if variant == "hf-generate-bf16":
            model = model.to(torch.bfloat16)
        tok.padding_side = "left"
        texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=tok.pad_token_id)
        kw.update(dict(do_sample=False) if greedy else dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0))
        if variant == "hf-generate-static-compile":
            kw.update(cache_implementation="static", compile_config=None)
            model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)

        def once(n):
            with torch.inference_mode():
                out = model.generate(**enc, **{**kw, "max_new_tokens": n, "min_new_tokens": n})
            return out.shape[1] - enc["input_ids"].shape[1]
    elif variant.startswith("loopchat"):
        backend = "hf" if "hf" in variant.split("-")[1:2] else "fast"
        dtype = torch.bfloat16 if variant.endswith("bf16") else torch.float32
        if device == "cuda":
            backend = "hf"
        gen = Generator(model, tok, backend=backend, fast_dtype=dtype)

        def once(n):
            p = SamplingParams(max_new_tokens=n, temperature=0 if greedy else 1.0, top_p=1.0, ignore_eos=True, seed=0)
            outs = gen.generate(prompts, p)
            return sum(len(c.token_ids) for g in outs for c in g) // len(prompts)
    elif variant == "vllm":
        from vllm import LLM, SamplingParams as VP  # optional

        llm = LLM(model=model.name_or_path, dtype="bfloat16")
        texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]

        def once(n):
            outs = llm.generate(texts, VP(max_tokens=n, ignore_eos=True, temperature=0 if greedy else 1.0))
            return sum(len(o.outputs[0].token_ids) for o in outs) // len(prompts)
    else:
        raise ValueError(variant)
    once(8)  # warm-up (and compilation, if any)
    sync(device)
    t0 = time.perf_counter()
    n = once(new_tokens)
    sync(device)
    dt = time.perf_counter() - t0
    prompt_tokens = len(apply_chat_template(tok, prompts[0]))
    return {"variant": variant, "device": device, "batch": batch, "new_tokens": n, "prompt_tokens": prompt_tokens,
            "seconds": dt, "tokens_per_s": batch * n / dt, "peak_mem_mib": peak_mem(device)}


def run_llamacpp(new_tokens: int) -> dict | None:
    sys.path.insert(0, str(HERE))
    from llamacpp_baseline import default_gguf_path, llamacpp_available, llamacpp_decode_tps

    if not llamacpp_available():
        return None
    r = llamacpp_decode_tps(default_gguf_path(), max_new_tokens=new_tokens, n_threads=int(os.environ.get("BENCH_THREADS", "2")))
    total = r.get("prefill_s", 0) + (r["new_tokens"] - 1) / r["decode_tps"]
    return {"variant": "llama.cpp Q4_1", "device": "cpu", "batch": 1, "new_tokens": r["new_tokens"], "prompt_tokens": r["prompt_tokens"],
            "seconds": total, "tokens_per_s": r["new_tokens"] / total, "decode_tps": r["decode_tps"],
            "peak_mem_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def in_subprocess(args: list[str]) -> dict | None:
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("{"):
            return json.loads(line)
    print(f"  variant {args} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="smoke run: 32 tokens, B in (1, 4)")
    ap.add_argument("--child", nargs=4, metavar=("VARIANT", "DEVICE", "BATCH", "TOKENS"), help=argparse.SUPPRESS)
    ap.add_argument("--llamacpp-child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        v, d, b, n = args.child
        print(json.dumps(run_variant(v, d, int(b), int(n))))
        return
    if args.llamacpp_child:
        print(json.dumps(run_llamacpp(args.llamacpp_child)))
        return

    cpu = args.device == "cpu"
    single_tokens = 32 if args.quick else (128 if cpu else 256)
    batch_tokens = 32 if args.quick else (64 if cpu else 256)
    batches = (1, 4) if args.quick else (1, 4, 16, 64)
    if cpu:
        single = ["hf-generate", "hf-generate-bf16", "loopchat-hf", "loopchat-fast-fp32", "loopchat-fast-bf16"]
        batched = ["hf-generate", "loopchat-fast-fp32", "loopchat-fast-bf16"]
    else:
        single = ["hf-generate", "hf-generate-static-compile", "loopchat-hf"]
        batched = ["hf-generate", "loopchat-hf"]
        try:
            import vllm  # noqa: F401

            single.append("vllm")
            batched.append("vllm")
        except ImportError:
            pass

    rows = []
    print(f"single stream: B=1, greedy, {single_tokens} new tokens", file=sys.stderr)
    for v in single:
        r = in_subprocess([v, args.device, "1", str(single_tokens)])
        if r:
            r["kind"] = "single"
            rows.append(r)
            print(f"  {v:28s} {r['tokens_per_s']:8.1f} tok/s", file=sys.stderr)
    if cpu:
        proc = subprocess.run([sys.executable, __file__, "--llamacpp-child", str(single_tokens)], capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines()[::-1] if x.startswith("{") or x == "null"), "null")
        r = json.loads(line)
        if r:
            r["kind"] = "single"
            rows.append(r)
            print(f"  {'llama.cpp':28s} {r['tokens_per_s']:8.1f} tok/s", file=sys.stderr)
        else:
            print("  llama.cpp: not installed (pip install '.[llamacpp]' with CMAKE_ARGS=-DGGML_NATIVE=OFF)", file=sys.stderr)
    print(f"batched sampling: {batch_tokens} new tokens per row", file=sys.stderr)
    for b in batches:
        for v in batched:
            r = in_subprocess([v if v != "loopchat-hf" else v, args.device, str(b), str(batch_tokens)])
            if r:
                r["kind"] = "batched"
                rows.append(r)
                print(f"  B={b:<3d} {v:24s} {r['tokens_per_s']:8.1f} tok/s", file=sys.stderr)

    import platform

    import torch

    header = f"device: {args.device} ({platform.processor() or platform.machine()}, {os.environ.get('BENCH_THREADS', '2')} threads)" if cpu else f"device: {torch.cuda.get_device_name()}"
    print(f"\n{header}, torch {torch.__version__}\n")
    base = {(r["kind"], r["batch"]): r["tokens_per_s"] for r in rows if r["variant"] == "hf-generate"}
    print("| kind | B | variant | tokens/s | vs generate | peak memory (MiB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ref = base.get((r["kind"], r["batch"]))
        speedup = f"{r['tokens_per_s'] / ref:.2f}x" if ref else "-"
        print(f"| {r['kind']} | {r['batch']} | {r['variant']} | {r['tokens_per_s']:.1f} | {speedup} | {r['peak_mem_mib']:.0f} |")
    out = HERE / "results" / f"generate-{args.device}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
