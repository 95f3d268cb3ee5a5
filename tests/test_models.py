"""Model specs: default, a GGUF (a tiny one written here), a checkpoint folder, a Hub id;
chat templating; pad != EOS; checkpoints load with plain transformers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from loopchat import models


def write_tiny_gguf(path: Path, hidden: int = 64, layers: int = 2, ff: int = 128, heads: int = 4, kv_heads: int = 2) -> dict:
    """Write a tiny llama GGUF with the embedded model's tokenizer and random F32 weights.
    Returns the tensors written (numpy, torch layout [out, in])."""
    import gguf

    src = gguf.GGUFReader(str(models.embedded_gguf_path()))
    field = lambda k: src.fields[k].contents()  # noqa: E731
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hidden // heads)
    w.add_file_type(0)
    w.add_tokenizer_model(field("tokenizer.ggml.model"))
    w.add_tokenizer_pre(field("tokenizer.ggml.pre"))
    tokens = field("tokenizer.ggml.tokens")
    w.add_vocab_size(len(tokens))
    w.add_token_list(tokens)
    w.add_token_types(field("tokenizer.ggml.token_type"))
    w.add_token_merges(field("tokenizer.ggml.merges"))
    w.add_bos_token_id(field("tokenizer.ggml.bos_token_id"))
    w.add_eos_token_id(field("tokenizer.ggml.eos_token_id"))
    w.add_unk_token_id(field("tokenizer.ggml.unknown_token_id"))
    w.add_pad_token_id(field("tokenizer.ggml.padding_token_id"))
    w.add_chat_template(field("tokenizer.chat_template"))
    rng = np.random.default_rng(0)
    t = {}
    rnd = lambda *s: (rng.standard_normal(s) * 0.05).astype(np.float32)  # noqa: E731
    t["token_embd.weight"] = rnd(len(tokens), hidden)
    t["output_norm.weight"] = (1 + rnd(hidden)).astype(np.float32)
    hd = hidden // heads
    for i in range(layers):
        t[f"blk.{i}.attn_norm.weight"] = (1 + rnd(hidden)).astype(np.float32)
        t[f"blk.{i}.attn_q.weight"] = rnd(hidden, hidden)
        t[f"blk.{i}.attn_k.weight"] = rnd(kv_heads * hd, hidden)
        t[f"blk.{i}.attn_v.weight"] = rnd(kv_heads * hd, hidden)
        t[f"blk.{i}.attn_output.weight"] = rnd(hidden, hidden)
        t[f"blk.{i}.ffn_norm.weight"] = (1 + rnd(hidden)).astype(np.float32)
        t[f"blk.{i}.ffn_gate.weight"] = rnd(ff, hidden)
        t[f"blk.{i}.ffn_up.weight"] = rnd(ff, hidden)
        t[f"blk.{i}.ffn_down.weight"] = rnd(hidden, ff)
    for name, arr in t.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return t


def test_gguf_is_converted_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LOOPCHAT_MODEL_CACHE", str(tmp_path / "cache"))
    gguf_file = tmp_path / "tiny.gguf"
    written = write_tiny_gguf(gguf_file)

    first = models.resolve_spec(str(gguf_file))
    assert first.converted and Path(first.path).parent == tmp_path / "cache"
    again = models.resolve_spec(str(gguf_file))
    assert not again.converted and again.path == first.path

    # a normal checkpoint: plain transformers loads it, with no GGUF quantization config
    plain = AutoModelForCausalLM.from_pretrained(first.path)
    assert getattr(plain.config, "quantization_config", None) is None
    assert plain.config.num_hidden_layers == 2
    np.testing.assert_array_equal(plain.model.embed_tokens.weight.detach().numpy(), written["token_embd.weight"])
    assert plain.lm_head.weight.data_ptr() == plain.model.embed_tokens.weight.data_ptr()  # tied

    # same function as loading the GGUF directly through transformers (q/k permutation undone)
    direct = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf").eval()
    ids = torch.tensor([[1, 520, 9531, 198, 23, 47, 88]])
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(ids).logits, direct(ids).logits, rtol=1e-5, atol=1e-5)

    model, tok = models.load(str(gguf_file))
    assert tok.pad_token_id != tok.eos_token_id
    assert model.loopchat_load_info["converted"] is False


def test_changed_gguf_gets_a_new_cache_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("LOOPCHAT_MODEL_CACHE", str(tmp_path / "cache"))
    a = tmp_path / "a" / "m.gguf"
    b = tmp_path / "b" / "m.gguf"
    a.parent.mkdir()
    b.parent.mkdir()
    write_tiny_gguf(a, hidden=64)
    write_tiny_gguf(b, hidden=32, heads=2, kv_heads=1)
    assert models.resolve_spec(str(a)).path != models.resolve_spec(str(b)).path


def test_checkpoint_folder_spec(tiny_dir):
    model, tok = models.load(tiny_dir)
    assert model.loopchat_load_info["path"] == tiny_dir
    assert next(model.parameters()).dtype == torch.float32  # fp32 on CPU
    assert not model.training


def test_bad_specs_name_the_problem(tmp_path):
    with pytest.raises(models.ModelSpecError, match="GGUF file not found"):
        models.resolve_spec(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(models.ModelSpecError, match="no config.json"):
        models.resolve_spec(str(tmp_path / "empty"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(models.ModelSpecError, match="not a .gguf"):
        models.resolve_spec(str(tmp_path / "weights.bin"))
    with pytest.raises(models.ModelSpecError, match="not found"):
        models.resolve_spec("./no/such/dir")


def test_hub_id_spec_passes_through():
    r = models.resolve_spec("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert r.path == "HuggingFaceTB/SmolLM2-135M-Instruct" and not r.converted


def test_pad_token_distinct_from_eos(tokenizer):
    assert tokenizer.pad_token_id is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


def test_set_pad_token_adds_one_when_nothing_fits(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.pad_token = tok.eos_token
    assert models.set_pad_token(tok) is False  # reuses <|endoftext|>
    assert tok.pad_token == "<|endoftext|>"


def test_chat_template(tokenizer):
    msgs = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "And?"}]
    ids = models.apply_chat_template(tokenizer, msgs)
    text = tokenizer.decode(ids)
    assert text.endswith("<|im_start|>user\nAnd?<|im_end|>\n<|im_start|>assistant\n")
    assert "<|im_start|>assistant\nHello!<|im_end|>" in text
    no_gen = models.apply_chat_template(tokenizer, msgs, add_generation_prompt=False)
    assert ids[: len(no_gen)] == no_gen and len(ids) > len(no_gen)


@pytest.mark.parametrize(
    "bad,match",
    [([{"role": "bot", "content": "x"}], "role"), ([{"role": "user", "content": 3}], "content"), (["hi"], "message 0")],
)
def test_chat_template_rejects_bad_messages(tokenizer, bad, match):
    with pytest.raises(ValueError, match=match):
        models.apply_chat_template(tokenizer, bad)


@pytest.mark.real_model
def test_embedded_default_loads_and_answers(embedded_dir):
    from loopchat.generate import Generator, SamplingParams

    model, tok = models.load("default")
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    saved = AutoModelForCausalLM.from_pretrained(embedded_dir)
    assert getattr(saved.config, "quantization_config", None) is None
    out = Generator(model, tok, fast_dtype=torch.float32).generate([[{"role": "user", "content": "What is the capital of France?"}]],
                                         SamplingParams(max_new_tokens=16, temperature=0))[0][0]
    assert "Paris" in out.text
