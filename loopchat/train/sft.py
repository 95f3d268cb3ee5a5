"""Step 1 — supervised fine-tuning on demonstrations.

Conversations (messages JSONL, or anything `read_file` reads: for preference/ranking files
the best-ranked reply is the demonstration) are rendered with the model's own chat
template. The loss is on the assistant's tokens only: each reply's content and the end of
turn token that closes it (so the model learns to stop), never the prompt, the system
prompt or the `<|im_start|>assistant\\n` header.

No compute goes to padding: conversations are packed into rows of max_seq_len tokens, each
with position ids restarting at 0 and a block-diagonal causal attention mask, so a packed
conversation sees exactly what it would see alone (tested numerically).

    cfg = SFTConfig(model="default", epochs=3)
    run_dir = run_sft(cfg)       # run_dir/final loads with AutoModelForCausalLM.from_pretrained
"""

from __future__ import annotations

import bisect
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field

from loopchat import models
from loopchat.data.formats import read_file, sft_messages
from loopchat.train.loop import Trainer, TrainConfig, is_main_process, jsonl_files, split_eval

IGNORE = -100
BUNDLED_DEMOS = Path(__file__).resolve().parent.parent / "data" / "bundled" / "demos"


class SFTConfig(TrainConfig):
    pack: bool = Field(True, description="pack several conversations into each row of max-seq-len tokens (no compute spent on padding); off = one conversation per row, padded")
    categories: list[str] = Field(default_factory=list, description="learn only from records whose 'category' (an extra key of the line, as in the bundled demos) is one of these; empty = all records")


class ChatTemplateError(ValueError):
    """The chat template does not render a conversation's prefixes as token prefixes of the
    whole, so we cannot tell which tokens are the assistant's."""


class SkipExample(ValueError):
    """A conversation SFT cannot learn from; counted and reported, never silently mangled."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


# ----------------------------------------------------------------------------- label mask


def _render(tok, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    return models.apply_chat_template(tok, messages, add_generation_prompt=add_generation_prompt)


def _common(a: list[int], b: list[int]) -> int:
    """Length of the common prefix."""
    n = min(len(a), len(b))
    return next((j for j in range(n) if a[j] != b[j]), n)


def tokenize_conversation(tok, messages: list[dict], max_seq_len: int | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation; labels are -100 except on assistant tokens.

    The assistant spans come from the tokenizer's own chat template, for any template: the
    reply to turn i starts where render(messages[:i], add_generation_prompt=True) ends (so the
    header is not learned) and ends at the last EOS of render(messages[:i+1]) (ChatML's "\\n"
    after <|im_end|> is never generated, so it is not learned either; a template without EOS
    ends the reply where that rendering stops agreeing with the whole). This needs rendered
    prefixes to be token prefixes of the whole conversation; a template that rewrites earlier
    turns breaks that and raises ChatTemplateError.
    """
    asst = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if not asst:
        raise SkipExample("no assistant reply", "nothing to learn from")
    if asst[0] == 0:
        raise SkipExample("starts with the assistant", "no prompt before the first assistant reply")
    full = _render(tok, messages, add_generation_prompt=False)
    if max_seq_len is not None and len(full) > max_seq_len:
        raise SkipExample("longer than max_seq_len", f"{len(full)} tokens > {max_seq_len}")
    labels = [IGNORE] * len(full)
    eos = tok.eos_token_id
    who = getattr(tok, "name_or_path", "?")
    for i in asst:
        head = _render(tok, messages[:i], add_generation_prompt=True)
        upto = _render(tok, messages[: i + 1], add_generation_prompt=False)
        # The prompt + header must be an exact token prefix: it is what the model is given at
        # inference, so training must continue exactly those tokens.
        if full[: len(head)] != head:
            k = _common(head, full)
            raise ChatTemplateError(
                f"chat template of {who!r}: the prompt before assistant turn {i} (with the generation header) is not a "
                f"token prefix of the whole conversation (first difference at token {k}: {tok.decode(head[k:k + 8])!r} vs "
                f"{tok.decode(full[k:k + 8])!r}); SFT needs templates whose rendered prefixes are prefixes of the whole"
            )
        start = len(head)
        # The reply ends at its EOS. Only the tokens up to it must match: what follows it (a
        # separator like "\n\n") may tokenize differently once the next turn is appended.
        c = _common(upto, full)
        tail = upto[start:]
        if eos is not None and eos in tail:
            end = start + len(tail) - tail[::-1].index(eos)
        else:  # a template that closes replies without EOS: up to where the renderings agree
            end = c
        if end <= start or end > c:
            raise ChatTemplateError(
                f"chat template of {who!r}: assistant turn {i} renders differently on its own than inside the whole "
                f"conversation (they agree up to token {c}: {tok.decode(full[c:c + 8])!r} vs {tok.decode(upto[c:c + 8])!r}); "
                "SFT needs templates whose rendered prefixes are prefixes of the whole (templates that rewrite earlier "
                "turns are not supported)"
            )
        labels[start:end] = full[start:end]
    return full, labels


# ----------------------------------------------------------------------------- data


def data_files(data: list[str]) -> list[Path]:
    """Files to read: each entry a file or a folder of *.jsonl / *.jsonl.gz; none = bundled demos."""
    return jsonl_files(data, BUNDLED_DEMOS, "SFT data")


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    group: int  # the record (conversation tree) it came from: the eval split is by record


@dataclass
class DataSummary:
    files: list[str] = field(default_factory=list)
    records: int = 0
    conversations: int = 0
    used: int = 0
    skipped: Counter = field(default_factory=Counter)
    skip_examples: dict = field(default_factory=dict)
    tokens: int = 0
    assistant_tokens: int = 0
    not_selected: int = 0  # records left out by a category filter (not an error, so not in `skipped`)
    categories: Counter = field(default_factory=Counter)  # records per category, before the filter

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        self.skip_examples.setdefault(reason, []).append(where) if len(self.skip_examples.get(reason, [])) < 3 else None

    def describe_skips(self) -> str:
        return "; ".join(f"{n} {r} (e.g. {', '.join(self.skip_examples.get(r, []))})" for r, n in self.skipped.most_common())


def load_examples(tok, files: list[Path], max_seq_len: int, categories: list[str] | None = None) -> tuple[list[Example], DataSummary]:
    """Read, render and label every conversation; count what is skipped and why. With
    `categories`, only records whose meta category is one of them are used."""
    s = DataSummary(files=[str(f) for f in files])
    out: list[Example] = []
    for f in files:
        for r_i, rec in enumerate(read_file(f)):  # strict: a malformed line raises FormatError naming file/line/field
            group = s.records
            s.records += 1
            where = f"{f.name} record {r_i + 1}"
            cat = rec.meta.get("category")
            s.categories[cat if isinstance(cat, str) else None] += 1
            if categories and cat not in categories:
                s.not_selected += 1
                continue
            paths = list(sft_messages(rec))
            if not paths:
                s.skip("no assistant reply", where)
                continue
            for msgs in paths:
                s.conversations += 1
                try:
                    ids, labels = tokenize_conversation(tok, msgs, max_seq_len)
                except SkipExample as e:
                    s.skip(e.reason, f"{where}: {e.detail}")
                    continue
                s.used += 1
                s.tokens += len(ids)
                s.assistant_tokens += sum(1 for x in labels if x != IGNORE)
                out.append(Example(ids, labels, group))
    return out, s


# ----------------------------------------------------------------------------- packing


def pack(examples: list[Example], max_seq_len: int) -> list[list[Example]]:
    """Best-fit decreasing: longest first, each into the fullest row it still fits. Rows are
    usually >95% full; the order is deterministic (ties by input order)."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))
    rows: list[list[Example]] = []
    free: list[tuple[int, int]] = []  # sorted (space left, row index)
    for i in order:
        ex = examples[i]
        n = len(ex.input_ids)
        j = bisect.bisect_left(free, (n, -1))
        if j < len(free):
            space, r = free.pop(j)
        else:
            space, r = max_seq_len, len(rows)
            rows.append([])
        rows[r].append(ex)
        if space - n > 0:
            bisect.insort(free, (space - n, r))
    return rows


def make_collate(pad_id: int):
    """Rows (lists of examples) -> a padded batch: input_ids, labels, position_ids restarting
    per conversation, seq_ids (which conversation each token belongs to; padding gets its
    own id), and the counts the trainer needs (num_units = labelled tokens after the shift)."""

    def collate(rows: list[list[Example]]) -> dict:
        L = max(sum(len(e.input_ids) for e in row) for row in rows)
        B = len(rows)
        input_ids = torch.full((B, L), pad_id, dtype=torch.long)
        labels = torch.full((B, L), IGNORE, dtype=torch.long)
        position_ids = torch.zeros((B, L), dtype=torch.long)
        seq_ids = torch.zeros((B, L), dtype=torch.long)
        real = 0
        for b, row in enumerate(rows):
            p = 0
            for k, ex in enumerate(row):
                n = len(ex.input_ids)
                input_ids[b, p : p + n] = torch.tensor(ex.input_ids)
                lab = torch.tensor(ex.labels)
                lab[0] = IGNORE  # never predict a conversation's first token from the previous one
                labels[b, p : p + n] = lab
                position_ids[b, p : p + n] = torch.arange(n)
                seq_ids[b, p : p + n] = k
                p += n
            real += p
            position_ids[b, p:] = torch.arange(L - p)
            seq_ids[b, p:] = len(row)  # padding: its own block, so no row is fully masked
        return {
            "input_ids": input_ids, "labels": labels, "position_ids": position_ids, "seq_ids": seq_ids,
            "num_units": int((labels[:, 1:] != IGNORE).sum()), "num_tokens": real, "num_padding": B * L - real,
        }

    return collate


def block_causal_mask(seq_ids: torch.Tensor, model=None) -> torch.Tensor:
    """(B, 1, L, L) mask: token q may attend to token k iff k <= q and both are in the same
    packed conversation. Boolean (True = attend) for SDPA; an additive float mask for
    attention implementations that add the mask to the scores (eager)."""
    L = seq_ids.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=seq_ids.device).tril()
    mask = ((seq_ids[:, :, None] == seq_ids[:, None, :]) & causal)[:, None]
    impl = getattr(getattr(model, "config", None), "_attn_implementation", "sdpa") if model is not None else "sdpa"
    if impl == "sdpa":
        return mask
    dtype = next(model.parameters()).dtype
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def sft_loss(model, batch: dict) -> tuple[torch.Tensor, int, dict]:
    """Summed next-token cross-entropy over the labelled (assistant) tokens."""
    inner = getattr(model, "module", model)  # DDP wrapper
    mask = block_causal_mask(batch["seq_ids"], inner)
    out = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"], use_cache=False)
    tgt = batch["labels"][:, 1:]
    keep = tgt != IGNORE
    logits = out.logits[:, :-1][keep].float()  # only labelled positions reach the fp32 softmax
    loss = F.cross_entropy(logits, tgt[keep], reduction="sum")
    return loss, int(keep.sum()), {}


# ----------------------------------------------------------------------------- the run


def prepare_data(tok, cfg: SFTConfig, log=print) -> tuple[list, list, dict]:
    """(train rows, eval rows, summary dict). Raises if nothing is left to learn from."""
    files = data_files(cfg.data)
    examples, s = load_examples(tok, files, cfg.max_seq_len, cfg.categories)
    missing = [c for c in cfg.categories if not s.categories.get(c)]
    if missing:
        have = ", ".join(sorted(c for c in s.categories if c)) or "none (no record has a 'category' key)"
        raise ValueError(f"SFT: no record of categor{'y' if len(missing) == 1 else 'ies'} {', '.join(map(repr, missing))} in {', '.join(map(str, files))}; categories there: {have}")
    if not examples:
        why = s.describe_skips() or "the files hold no conversations"
        hint = " (raise --max-seq-len)" if "longer than max_seq_len" in s.skipped else ""
        raise ValueError(f"SFT: no usable conversations in {', '.join(map(str, files))}: {why}{hint}")
    groups = sorted({e.group for e in examples})
    train_g, eval_g = split_eval(groups, cfg.eval_fraction, cfg.seed)
    eval_g = set(eval_g)
    train_ex = [e for e in examples if e.group not in eval_g]
    eval_ex = [e for e in examples if e.group in eval_g]
    to_rows = (lambda ex: pack(ex, cfg.max_seq_len)) if cfg.pack else (lambda ex: [[e] for e in ex])
    train_rows, eval_rows = to_rows(train_ex), to_rows(eval_ex)
    train_tokens = sum(len(e.input_ids) for e in train_ex)
    summary = {
        "files": s.files, "records": s.records, "conversations": s.conversations, "used": s.used,
        "categories": list(cfg.categories), "not_selected": s.not_selected,
        "skipped": dict(s.skipped), "skip_examples": s.skip_examples,
        "train_conversations": len(train_ex), "eval_conversations": len(eval_ex),
        "tokens": s.tokens, "assistant_tokens": s.assistant_tokens,
        "assistant_fraction": round(s.assistant_tokens / max(1, s.tokens), 4),
        "train_rows": len(train_rows), "eval_rows": len(eval_rows),
        # With packing, rows of a micro-batch are padded to the longest; this is the bound
        # if every row were padded to max_seq_len. Without packing: padding to the longest
        # conversation of each micro-batch, reported per step in metrics.jsonl as pad_frac.
        "padding_fraction_bound": round(1 - train_tokens / max(1, len(train_rows) * cfg.max_seq_len), 4),
    }
    skipped = sum(s.skipped.values())
    log(
        f"[sft] {s.records} records from {len(files)} file(s) -> {s.conversations} conversations: "
        f"{s.used} used ({len(train_ex)} train / {len(eval_ex)} eval), {skipped} skipped"
        + (f", {s.not_selected} records outside categories {', '.join(cfg.categories)}" if cfg.categories else "")
        + (f" [{s.describe_skips()}]" if skipped else "")
    )
    log(
        f"[sft] {s.tokens} tokens, {s.assistant_tokens} learned ({100 * summary['assistant_fraction']:.1f}% assistant); "
        f"{len(train_rows)} train rows of <= {cfg.max_seq_len} tokens"
        + (f", packed {100 * (1 - summary['padding_fraction_bound']):.1f}% full" if cfg.pack else "")
    )
    return train_rows, eval_rows, summary


def run_sft(cfg: SFTConfig) -> Path:
    """Fine-tune cfg.model on the demonstrations; returns the run folder (final/ inside)."""
    # fp32 master weights on every device; bf16 comes from autocast (cfg.bf16).
    model, tok = models.load(cfg.model, device="cpu", dtype=torch.float32, eval_mode=False)
    log = print if is_main_process() else (lambda *a, **k: None)
    # Data problems fail here, before a run folder exists.
    train_rows, eval_rows, summary = prepare_data(tok, cfg, log)
    trainer = Trainer(cfg, model, tok, kind="sft")
    if trainer.is_main:
        (trainer.run_dir / "data_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    collate = make_collate(tok.pad_token_id)

    def loss_fn(m, batch):
        loss, n, metrics = sft_loss(m, batch)
        return loss, n, {**metrics, "pad_frac": batch["num_padding"] / batch["input_ids"].numel()}

    trainer.fit(train_rows, eval_rows, collate, loss_fn)
    if trainer.is_main:
        log(f"[sft] done: {trainer.run_dir / 'final'}")
    return trainer.run_dir
