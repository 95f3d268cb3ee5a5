"""Batched sampling, K samples, left padding, stop strings, streaming UTF-8 safety."""

from __future__ import annotations

import pytest
import torch

from loopchat.generate import Generator, IncrementalDecoder, SamplingParams, StopChecker, sample_next

PROMPTS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Write a long and detailed story about a lighthouse keeper and the sea."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
]


@pytest.fixture(scope="module", params=["hf", "fast"])
def gen(tiny, request):
    """Both backends; the fast decoder in fp32 so it must agree with transformers exactly."""
    model, tok = tiny
    g = Generator(model, tok, backend=request.param, fast_dtype=torch.float32)
    assert g.backend == request.param
    return g


def test_batched_greedy_equals_each_prompt_alone(gen):
    p = SamplingParams(max_new_tokens=12, temperature=0)
    batch = gen.generate(PROMPTS, p)
    lens = {len(gen.encode(x)) for x in PROMPTS}
    assert len(lens) == 3  # different lengths, so left padding is really exercised
    for i, prompt in enumerate(PROMPTS):
        alone = gen.generate([prompt], p)[0][0]
        assert batch[i][0].token_ids == alone.token_ids
        assert batch[i][0].text == alone.text


def test_left_padding_matches_unpadded_forward(gen):
    """The first generated token's log-prob in a padded batch equals a plain forward alone."""
    model = gen.model
    p = SamplingParams(max_new_tokens=1, temperature=0)
    batch = gen.generate(PROMPTS, p)
    for i, prompt in enumerate(PROMPTS):
        ids = torch.tensor([gen.encode(prompt)])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[0, -1].float(), -1)
        assert batch[i][0].token_ids[0] == int(lp.argmax())
        assert batch[i][0].logprobs[0] == pytest.approx(float(lp.max()), abs=1e-4)


def test_k_samples_per_prompt_and_seed(gen):
    p = SamplingParams(max_new_tokens=10, temperature=1.0, num_samples=4, seed=123)
    a = gen.generate(PROMPTS[:2], p)
    assert [len(g) for g in a] == [4, 4]
    assert len({tuple(c.token_ids) for c in a[0]}) > 1  # K different alternatives
    b = gen.generate(PROMPTS[:2], p)
    assert [[c.token_ids for c in g] for g in a] == [[c.token_ids for c in g] for g in b]  # same seed, same samples
    for c in a[0]:
        assert len(c.logprobs) == len(c.token_ids) and all(lp <= 0 for lp in c.logprobs)
        assert c.finish_reason in ("stop", "length")


def test_length_finish_reason_and_budget(gen):
    out = gen.generate(PROMPTS[1:2], SamplingParams(max_new_tokens=5, temperature=1.0, seed=0))[0][0]
    assert len(out.token_ids) <= 5
    if len(out.token_ids) == 5:
        assert out.finish_reason == "length"


def test_stop_strings_cut_the_text(gen):
    free = gen.generate(PROMPTS[1:2], SamplingParams(max_new_tokens=20, temperature=0))[0][0]
    assert len(free.text) > 4
    stop = free.text[3:5]  # a stop string that certainly occurs
    cut = gen.generate(PROMPTS[1:2], SamplingParams(max_new_tokens=20, temperature=0, stop=[stop]))[0][0]
    assert cut.finish_reason == "stop"
    assert stop not in cut.text
    assert free.text.startswith(cut.text)
    assert cut.text == free.text[: free.text.find(stop)]
    streamed = "".join(gen.stream(PROMPTS[1], SamplingParams(max_new_tokens=20, temperature=0, stop=[stop])))
    assert streamed == cut.text


def test_stream_equals_generate(gen):
    p = SamplingParams(max_new_tokens=15, temperature=0)
    pieces = list(gen.stream(PROMPTS[1], p))
    assert len(pieces) > 1
    assert "".join(pieces) == gen.generate(PROMPTS[1:2], p)[0][0].text


def test_incremental_decoder_never_splits_utf8(tokenizer):
    text = "Ünïcödé ✓ 漢字テスト 🚀🎉 mixed ascii — “quotes” done"
    ids = tokenizer.encode(text, add_special_tokens=False)
    # the test is only meaningful if some character spans several tokens
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    dec = IncrementalDecoder(tokenizer)
    pieces = [dec.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tokenizer.decode(ids)


def test_stop_checker_holds_back_a_possible_prefix():
    s = StopChecker(["\nUser:", "###"])
    assert s.safe_len("hello\nUs") == len("hello")
    assert s.safe_len("hello #") == len("hello ")
    assert s.safe_len("hello") == 5
    assert s.find("abc###def") == 3 and s.find("abc") == -1


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0, -1.0]]).repeat(200, 1)
    g = torch.Generator().manual_seed(0)
    toks, lps = sample_next(logits, SamplingParams(temperature=1.0, top_k=2), g)
    assert set(toks.tolist()) <= {0, 1} and len(set(toks.tolist())) == 2
    toks, _ = sample_next(logits, SamplingParams(temperature=1.0, top_p=0.5), g)
    assert set(toks.tolist()) == {0}  # token 0 alone has > 50% of the mass
    # log-probs come from the full distribution, not the truncated one
    toks, lps = sample_next(logits, SamplingParams(temperature=1.0, top_k=2), g)
    assert torch.allclose(lps, torch.log_softmax(logits[0], -1)[toks], atol=1e-6)


def test_logprobs_are_at_the_sampling_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    tok, lp = sample_next(logits, SamplingParams(temperature=0.5), g)
    expected = torch.log_softmax(logits / 0.5, -1)[0, tok[0]]
    assert lp[0] == pytest.approx(float(expected), abs=1e-6)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
     ({"num_samples": 0}, "num_samples"), ({"stop": "x"}, "stop")],
)
def test_bad_sampling_params(gen, kwargs, match):
    with pytest.raises(ValueError, match=match):
        gen.generate(PROMPTS[:1], SamplingParams(**kwargs))


def test_oversized_prompt_is_a_clear_error(gen):
    long = [{"role": "user", "content": "word " * 2000}]
    with pytest.raises(ValueError, match=r"prompt 0 is \d+ tokens.*context of 1024"):
        gen.generate([long], SamplingParams(max_new_tokens=8))


def test_wrong_prompt_types(gen):
    with pytest.raises(TypeError):
        gen.generate("just a string", SamplingParams())
    with pytest.raises(TypeError):
        gen.generate([42], SamplingParams())
