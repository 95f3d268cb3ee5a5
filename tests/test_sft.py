"""SFT: the assistant-only label mask, packing, bad inputs, and short runs on a tiny model."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch

from loopchat.data.formats import FormatError, iter_jsonl
from loopchat.train.sft import (
    IGNORE,
    ChatTemplateError,
    Example,
    SFTConfig,
    SkipExample,
    block_causal_mask,
    make_collate,
    pack,
    prepare_data,
    run_sft,
    sft_loss,
    tokenize_conversation,
)

MULTI = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome, since 1871."},
]


def conversations(n: int = 12) -> list[list[dict]]:
    """Short, varied, learnable conversations (the answer repeats a word of the question)."""
    words = ["apple", "river", "stone", "cloud", "lamp", "tiger", "bread", "glass", "music", "paper", "snow", "honey"]
    out = []
    for i in range(n):
        w = words[i % len(words)]
        msgs = [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": f"{w} {w}."}]
        if i % 3 == 0:
            msgs += [{"role": "user", "content": "Again?"}, {"role": "assistant", "content": f"Yes: {w}."}]
        out.append(msgs)
    return out


def write_jsonl(path: Path, convs: list[list[dict]]) -> Path:
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    return path


def labelled_spans(ids: list[int], labels: list[int]) -> list[list[int]]:
    spans, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != IGNORE:
            assert lab == i
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    return spans


# ----------------------------------------------------------------------------- label mask


def test_label_mask_multiturn(tokenizer):
    ids, labels = tokenize_conversation(tokenizer, MULTI)
    assert len(ids) == len(labels)
    spans = labelled_spans(ids, labels)
    eos = tokenizer.eos_token_id
    # exactly two labelled spans: each assistant reply's content followed by its EOS
    assert [tokenizer.decode(s) for s in spans] == ["Paris." + tokenizer.eos_token, "Rome, since 1871." + tokenizer.eos_token]
    assert all(s[-1] == eos for s in spans)
    # nothing from the system prompt, user turns or the assistant header is labelled
    learned = tokenizer.decode([t for t in labels if t != IGNORE])
    for not_learned in ("Answer briefly", "capital", "Italy", "assistant", "<|im_start|>", "user"):
        assert not_learned not in learned
    # the whole conversation is the template's rendering, unchanged
    assert ids == tokenizer.apply_chat_template(MULTI, tokenize=True, return_dict=False)


def test_label_mask_any_template(tokenizer):
    # A non-ChatML template with a different header and a separator after the EOS.
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}### Assistant:\n{{ m['content'] }}{{ eos_token }}\n\n"
        "{% else %}### {{ m['role'] }}:\n{{ m['content'] }}\n\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
    )
    ids, labels = tokenize_conversation(tok, MULTI)
    assert [tok.decode(s) for s in labelled_spans(ids, labels)] == ["Paris" + ".<|im_end|>", "Rome, since 1871.<|im_end|>"]


def test_template_breaking_prefix_property_raises(tokenizer):
    # Renders only the last assistant reply (as some "reasoning" templates drop old thoughts).
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and not loop.last %}[...]{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(ChatTemplateError, match="prefix"):
        tokenize_conversation(tok, MULTI)


def test_skip_reasons(tokenizer):
    with pytest.raises(SkipExample, match="no assistant reply"):
        tokenize_conversation(tokenizer, [{"role": "user", "content": "hi"}])
    with pytest.raises(SkipExample, match="longer than max_seq_len"):
        tokenize_conversation(tokenizer, MULTI, max_seq_len=20)


# ----------------------------------------------------------------------------- packing


def test_pack_best_fit():
    lengths = [50, 10, 40, 30, 60, 20, 90, 5, 45]
    exs = [Example([1] * n, [IGNORE] * n, i) for i, n in enumerate(lengths)]
    rows = pack(exs, 100)
    assert sorted(id(e) for r in rows for e in r) == sorted(id(e) for e in exs)
    assert all(sum(len(e.input_ids) for e in r) <= 100 for r in rows)
    assert len(rows) == 4  # 350 tokens: the lower bound is 4 rows of 100


def test_packed_loss_equals_separate(tiny):
    model, tok = tiny
    convs = [MULTI] + conversations(3)
    exs = [Example(*tokenize_conversation(tok, c), i) for i, c in enumerate(convs)]
    collate = make_collate(tok.pad_token_id)
    packed = collate([exs])
    assert packed["num_padding"] == 0 and packed["input_ids"].shape[0] == 1
    with torch.no_grad():
        loss_p, n_p, _ = sft_loss(model, packed)
        alone = [sft_loss(model, collate([[e]])) for e in exs]
        # and a padded batch of separate rows (padding must not change anything either)
        loss_b, n_b, _ = sft_loss(model, collate([[e] for e in exs]))
    loss_s, n_s = sum(a[0] for a in alone), sum(a[1] for a in alone)
    assert n_p == n_s == n_b == sum(sum(x != IGNORE for x in e.labels) for e in exs)
    assert abs(loss_p.item() - loss_s.item()) / n_s < 1e-5
    assert abs(loss_b.item() - loss_s.item()) / n_s < 1e-5


def test_packed_conversations_do_not_attend_to_each_other(tiny):
    model, tok = tiny
    a = Example(*tokenize_conversation(tok, conversations(1)[0]), 0)
    b = Example(*tokenize_conversation(tok, MULTI), 1)
    a2 = Example([a.input_ids[0]] + [tok.convert_tokens_to_ids("x")] * (len(a.input_ids) - 1), a.labels, 0)
    collate = make_collate(tok.pad_token_id)
    inner = collate([[a, b]])
    na = len(a.input_ids)

    def logits(batch, mask):
        with torch.no_grad():
            return model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"]).logits[0, na:]

    x, y = collate([[a, b]]), collate([[a2, b]])
    mx, my = block_causal_mask(x["seq_ids"], model), block_causal_mask(y["seq_ids"], model)
    assert torch.allclose(logits(x, mx), logits(y, my), atol=1e-6)  # b is blind to what a says
    # the mask is block diagonal and causal
    m = mx[0, 0]
    assert not m[na:, :na].any() and not m[:na, na:].any() and not m.triu(1).any()
    # sanity: with a plain causal mask b would see a (so the check above can fail)
    plain = torch.ones_like(mx).tril()
    assert not torch.allclose(logits(x, plain), logits(y, plain), atol=1e-4)
    assert inner["position_ids"][0, na].item() == 0


# ----------------------------------------------------------------------------- bad inputs


def test_bad_inputs(tmp_path, tokenizer):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(FormatError, match="no records"):
        prepare_data(tokenizer, SFTConfig(data=[str(empty)]), log=lambda *a: None)

    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"messages": MULTI}) + "\n" + '{"messages": [{"role": "user"}]}\n')
    with pytest.raises(FormatError, match=r"broken.jsonl line 2.*content"):
        prepare_data(tokenizer, SFTConfig(data=[str(broken)]), log=lambda *a: None)

    no_reply = write_jsonl(tmp_path / "no_reply.jsonl", [[{"role": "user", "content": "hello?"}]] * 3)
    with pytest.raises(ValueError, match="3 no assistant reply"):
        prepare_data(tokenizer, SFTConfig(data=[str(no_reply)]), log=lambda *a: None)

    long = [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok"}]
    mixed = write_jsonl(tmp_path / "mixed.jsonl", conversations(4) + [long, [{"role": "user", "content": "hi"}]])
    lines: list[str] = []
    train, ev, s = prepare_data(tokenizer, SFTConfig(data=[str(mixed)], max_seq_len=128, eval_fraction=0), log=lines.append)
    assert s["used"] == 4 and s["skipped"] == {"longer than max_seq_len": 1, "no assistant reply": 1}
    assert "2 skipped" in lines[0] and "mixed.jsonl record 5" in lines[0]
    # never truncated: every packed token belongs to a whole conversation
    assert sum(len(e.input_ids) for r in train for e in r) == s["tokens"]
    with pytest.raises(ValueError, match="longer than max_seq_len.*raise --max-seq-len"):
        prepare_data(tokenizer, SFTConfig(data=[str(write_jsonl(tmp_path / "l.jsonl", [long]))], max_seq_len=64), log=lambda *a: None)


def test_category_filter(tmp_path, tokenizer):
    """--categories learns only from records of those categories (PPO-ptx uses it to anchor the
    behaviours a reward model judges worst); a category no record has is an error naming it."""
    rows = [{"messages": m, "category": c} for m, c in zip(conversations(5), ["hold_ground", "helpful", "cannot_act", "helpful", None])]
    f = tmp_path / "cats.jsonl"
    f.write_text("".join(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n" for r in rows))
    lines: list[str] = []
    train, _, s = prepare_data(tokenizer, SFTConfig(data=[str(f)], categories=["hold_ground", "cannot_act"], max_seq_len=128, eval_fraction=0, pack=False), log=lines.append)
    assert s["used"] == 2 and s["not_selected"] == 3 and s["skipped"] == {}
    assert "3 records outside categories hold_ground, cannot_act" in lines[0]
    want = {tuple(tokenize_conversation(tokenizer, rows[i]["messages"], 128)[0]) for i in (0, 2)}
    assert {tuple(r[0].input_ids) for r in train} == want
    _, _, every = prepare_data(tokenizer, SFTConfig(data=[str(f)], max_seq_len=128, eval_fraction=0), log=lambda *a: None)
    assert every["used"] == 5 and every["not_selected"] == 0
    with pytest.raises(ValueError, match=r"no record of category 'clarfy'.*categories there: cannot_act, helpful, hold_ground"):
        prepare_data(tokenizer, SFTConfig(data=[str(f)], categories=["clarfy", "helpful"]), log=lambda *a: None)


def test_config_fields_documented():
    missing = [k for k, f in SFTConfig.model_fields.items() if not f.description]
    assert not missing


# ----------------------------------------------------------------------------- runs


def tiny_cfg(tmp_path, tiny_dir, **kw) -> SFTConfig:
    data = write_jsonl(tmp_path / "demos.jsonl", conversations(12))
    base = dict(
        model=tiny_dir, data=[str(data)], out=str(tmp_path / "run"), max_seq_len=96, batch_size=4, grad_accum=2,
        lr=3e-3, warmup_ratio=0.0, epochs=100, max_steps=8, eval_fraction=0.2, eval_every=4, save_every=0, bf16=False, seed=0,
    )
    base.update(kw)
    return SFTConfig(**base)


def test_sft_run_reduces_loss_and_writes_run_folder(tmp_path, tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = run_sft(tiny_cfg(tmp_path, tiny_dir, bf16=True))
    for f in ("config.yaml", "metrics.jsonl", "curves.png", "data_summary.json", "final/config.json", "final/model.safetensors", "state/latest"):
        assert (run / f).exists(), f
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if "loss" in r]
    evals = [r["eval_loss"] for r in recs if "eval_loss" in r]
    assert [r["step"] for r in train] == list(range(1, 9))
    assert all(k in train[0] for k in ("epoch", "lr", "tokens_per_s", "elapsed"))
    assert train[-1]["loss"] < train[0]["loss"] - 0.5
    assert evals[-1] < evals[0] - 0.5
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    tok = AutoTokenizer.from_pretrained(run / "final")
    assert tok.chat_template and tok.pad_token_id != tok.eos_token_id
    assert json.loads((run / "final" / "training_info.json").read_text())["step"] == 8
    assert model.config.use_cache
    ids = tok.apply_chat_template([{"role": "user", "content": "Say apple."}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]


def test_lora_run_saves_merged_model(tmp_path, tiny_dir):
    from safetensors.torch import load_file

    run = run_sft(tiny_cfg(tmp_path, tiny_dir, lora=True, lora_r=4, lr=1e-2, max_steps=3, eval_fraction=0, gradient_checkpointing=True))
    final = run / "final"
    assert not (final / "adapter_config.json").exists()
    base = load_file(Path(tiny_dir) / "model.safetensors")
    merged = load_file(final / "model.safetensors")
    assert set(merged) == set(base)  # plain weights, no lora_A/lora_B
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    assert any("q_proj" in k for k in changed) and any("mlp" in k for k in changed)
    assert not any("embed" in k or "norm" in k for k in changed)  # only adapted linears move
    cfg = json.loads((final / "config.json").read_text())
    assert cfg["use_cache"] is not False  # turned off for gradient checkpointing while training only
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]


# ----------------------------------------------------------------------------- the bundled demonstrations


# Words that say nothing about a prompt's topic; what is left decides whether two prompts match.
_STOP = set("a an the i me my you your it its is are was were be do does did how what whats which who when where why "
            "can could would should will to of in on at for with and or but so this that these those there here about "
            "from by as if not no yes just please some any much many more most very really like get".split())


def _norm(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower().replace("'", "").replace("\u2019", "")))


def _same_prompt(a: str, b: str) -> bool:
    """The same question reworded: identical once normalised (3+ words), or 75%+ shared topic words."""
    na, nb = _norm(a), _norm(b)
    if na == nb:
        return len(na.split()) >= 3  # "make it shorter" is a follow-up anyone may write
    wa, wb = set(na.split()) - _STOP, set(nb.split()) - _STOP
    return min(len(wa), len(wb)) >= 3 and len(wa & wb) / len(wa | wb) >= 0.75


def test_bundled_demos_shape_and_disjoint_from_the_eval():
    """The shipped set meets the issue's shape, and no demo user turn is (nearly) an evaluation prompt."""
    from collections import Counter

    from loopchat.evaluate import rubric
    from loopchat.train.sft import BUNDLED_DEMOS

    rows = [obj for f in sorted(BUNDLED_DEMOS.glob("*.jsonl")) for _, _, obj in iter_jsonl(f)]
    assert len(rows) >= 600
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids))
    multi = sum(sum(m["role"] == "user" for m in r["messages"]) >= 2 for r in rows)
    assert multi >= len(rows) / 3
    cats = Counter(r["category"] for r in rows)
    wanted = set(rubric.CATEGORIES) - {"concise"}  # concision is taught by every reply, not a category of its own
    assert wanted <= set(cats), wanted - set(cats)
    for r in rows:
        roles = [m["role"] for m in r["messages"] if m["role"] != "system"]
        assert roles[-1] == "assistant" and all(x == ("user", "assistant")[i % 2] for i, x in enumerate(roles)), r["id"]
    # Harmless-but-edgy demonstrations teach helping: none of their replies may read as a refusal.
    for r in rows:
        if r["category"] == "edgy_harmless":
            for m in r["messages"]:
                assert m["role"] != "assistant" or not rubric.is_refusal(m["content"]), r["id"]
    eval_turns = [m["content"] for it in rubric.load_items() for m in it["messages"] if m["role"] == "user"]
    leaks = [(r["id"], m["content"][:60], e[:60]) for r in rows for m in r["messages"] if m["role"] == "user"
             for e in eval_turns if _same_prompt(m["content"], e)]
    assert not leaks, leaks
