"""The fast CPU decoder reproduces the transformers forward (fp32 exactly, bf16 closely),
with left padding and dropped rows, and refuses architectures it does not implement."""

from __future__ import annotations

import pytest
import torch

from loopchat import fastdecode
from loopchat.generate import Generator, SamplingParams


def hf_last_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float()


def padded(prompts, pad):
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad)
    mask = torch.zeros((len(prompts), L), dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(p)
        mask[i, L - len(p):] = True
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 0.15)])
def test_prefill_and_decode_match_transformers_with_left_padding(tiny, dtype, tol):
    model, tok = tiny
    prompts = [[1, 520, 9531, 198, 23], [1, 47, 88, 12, 900, 33, 71, 5, 19], [1, 2000]]
    ids, mask, pos = padded(prompts, tok.pad_token_id)
    fast = fastdecode.FastLlama(model, dtype=dtype)
    fast.reset(len(prompts), ids.size(1) + 4)
    logits = fast.forward(ids, pos, mask)
    assert torch.isfinite(logits).all()
    for i, p in enumerate(prompts):
        torch.testing.assert_close(logits[i], hf_last_logits(model, p), atol=tol, rtol=0)
    # one decode step per row with the next token 7, then drop row 1 and step again
    nxt = torch.full((3, 1), 7)
    mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.bool)], 1)
    logits = fast.forward(nxt, pos[:, -1:] + 1, mask)
    for i, p in enumerate(prompts):
        torch.testing.assert_close(logits[i], hf_last_logits(model, p + [7]), atol=tol, rtol=0)
    keep = torch.tensor([0, 2])
    fast.select_rows(keep)
    mask = torch.cat([mask[keep], torch.ones(2, 1, dtype=torch.bool)], 1)
    logits = fast.forward(torch.full((2, 1), 9), pos[keep, -1:] + 2, mask)
    for j, i in enumerate(keep.tolist()):
        torch.testing.assert_close(logits[j], hf_last_logits(model, prompts[i] + [7, 9]), atol=tol, rtol=0)


def test_refresh_picks_up_new_weights(tiny_dir):
    from loopchat import models

    model, tok = models.load(tiny_dir)
    gen = Generator(model, tok, backend="fast", fast_dtype=torch.float32)
    p = SamplingParams(max_new_tokens=6, temperature=0)
    prompt = [[{"role": "user", "content": "hello"}]]
    before = gen.generate(prompt, p)[0][0].token_ids
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(-3.0)  # a drastic "training step"
    stale = gen.generate(prompt, p)[0][0].token_ids
    gen.refresh()
    fresh = gen.generate(prompt, p)[0][0].token_ids
    assert stale == before
    assert fresh == Generator(model, tok, backend="hf").generate(prompt, p)[0][0].token_ids


def test_unsupported_architectures_fall_back(tiny_dir, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, attention_bias=True)
    model = LlamaForCausalLM(cfg).eval()
    assert not fastdecode.supports(model)
    with pytest.raises(ValueError, match="does not support"):
        fastdecode.FastLlama(model)
    assert Generator(model, tokenizer).backend == "hf"
    with pytest.raises(ValueError):
        Generator(model, tokenizer, backend="warp")
