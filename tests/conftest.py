"""Shared fixtures: an isolated LOOPCHAT_HOME per test session, the embedded model's
converted checkpoint (shared cache, converted at most once), and tiny random models that
use the real tokenizer so unit tests stay fast."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

# Keep the user's converted models (setup.sh fills them) but nothing else of theirs.
_real_cache = os.environ.get("LOOPCHAT_MODEL_CACHE") or str(
    Path(os.environ.get("LOOPCHAT_HOME", Path.home() / ".loopchat")).expanduser() / "models"
)
os.environ["LOOPCHAT_MODEL_CACHE"] = _real_cache
os.environ["LOOPCHAT_HOME"] = tempfile.mkdtemp(prefix="loopchat-test-home-")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def embedded_dir() -> str:
    """Folder of the embedded SmolLM2-135M-Instruct, converted from its GGUF (cached)."""
    from loopchat import models

    return models.resolve_spec("default").path


@pytest.fixture(scope="session")
def tokenizer(embedded_dir):
    from loopchat.models import load_tokenizer

    return load_tokenizer(embedded_dir)


def make_tiny_checkpoint(path: Path, tokenizer, seed: int = 0, layers: int = 2, hidden: int = 64) -> Path:
    """A randomly initialised Llama-shaped model with the real tokenizer, saved as a normal
    Hugging Face checkpoint folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer) -> str:
    return str(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), tokenizer))


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    from loopchat import models

    return models.load(tiny_dir)
