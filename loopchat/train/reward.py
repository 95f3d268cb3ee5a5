"""Step 2 — the reward model, trained on rankings of K alternative replies.

A causal-LM backbone with a scalar head (Hugging Face `*ForSequenceClassification` with
num_labels=1, so the checkpoint loads with `AutoModelForSequenceClassification`). The head
runs at every position; the reward of a reply is the head's output at the LAST REAL token,
found from the attention mask, so left and right padding give the same reward (PPO's value
model reads the same head at every response token).

InstructGPT's loss. A labeller ranks K replies to one prompt; every one of the C(K, 2)
pairs (better, worse) gives -log sigmoid(r_better - r_worse). All pairs of a ranking stay in
one batch element, so the K replies go through the model ONCE (not once per pair: 4 passes
instead of 12 at K = 4), and the model never sees the same reply in two steps of an epoch
(InstructGPT found shuffled pairs overfit). Tied replies give no pair. The loss is the mean
over the pairs of the optimizer step.

Normalisation. A reward model is only defined up to a constant. After training we measure
the mean reward of the SFT demonstrations and store it as `loopchat_reward_offset` in the
checkpoint's config.json; `normalised = raw - offset`, so demonstrations score 0 on average
(InstructGPT did the same before PPO) and PPO's KL penalty and rewards share one scale.

Data: ranking JSONL (ours), preference files (TRL, hh-rlhf, UltraFeedback: K = 2), and the
store (people's rankings, plus thumbs up vs down on sibling replies).

    cfg = RMConfig(model="runs/sft/final")
    run_dir = run_rm(cfg)       # run_dir/final: AutoModelForSequenceClassification + offset
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field

from loopchat import models
from loopchat.data.formats import ranking_rows, read_file, sft_messages
from loopchat.data.records import RankingRecord
from loopchat.train.loop import Trainer, TrainConfig, is_main_process, jsonl_files, split_eval, to_device, use_bf16

BUNDLED_COMPARISONS = Path(__file__).resolve().parent.parent / "data" / "bundled" / "comparisons"
OFFSET_KEY = "loopchat_reward_offset"


class RMConfig(TrainConfig):
    # Reward models overfit after about one epoch (InstructGPT trained for one).
    epochs: float = Field(1, gt=0, description="passes over the training rankings (reward models overfit after ~1)")
    batch_size: int = Field(8, ge=1, description="rankings per optimizer step over all processes (each ranking = its K replies)")
    grad_accum: int = Field(2, ge=1, description="micro-steps per optimizer step")
    max_seq_len: int = Field(768, ge=16, description="longest prompt + reply in tokens; longer rankings are skipped (counted)")
    store: bool = Field(False, description="also train on the store's rankings and thumbs up/down of sibling replies")
    db: str | None = Field(None, description="store URL for --store (default: $LOOPCHAT_HOME/loopchat.db)")
    offset_data: list[str] = Field(default_factory=list, description="demonstrations whose mean reward becomes 0 (default: the bundled SFT demonstrations)")
    offset_samples: int = Field(256, ge=1, description="how many demonstrations (seeded sample) measure the normalisation offset")


# ----------------------------------------------------------------------------- the model


def _backbone_and_head(model):
    """(transformer body, scalar head) of a *ForSequenceClassification model; a peft model
    is looked through (its LoRA layers and trainable head copy live inside)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return getattr(model, model.base_model_prefix), model.score


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Left padding shifts every real token right; positions must still start at 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def token_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The scalar head at every position: float32 [B, T]."""
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    body, head = _backbone_and_head(model)
    h = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).last_hidden_state
    return head(h).squeeze(-1).float()


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, for left or right padding."""
    T = attention_mask.size(1)
    idx = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), idx, torch.full_like(idx, -1)).max(dim=1).values


def gather_last(scores: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    return scores.gather(1, last_token_index(attention_mask)[:, None]).squeeze(1)


def reward_offset(model) -> float:
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return float(getattr(model.config, OFFSET_KEY, 0.0) or 0.0)


class ScoreModel(torch.nn.Module):
    """Trainable wrapper whose forward returns the reward at the last real token. It exists
    so DDP (accelerate) sees the forward that computes the loss, and gradients are synced."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, input_ids, attention_mask):
        return gather_last(token_scores(self.hf, input_ids, attention_mask), attention_mask)


def resolve_reward_spec(spec: str) -> str:
    """A run folder means its final/ checkpoint."""
    p = Path(str(spec)).expanduser()
    if p.is_dir() and not (p / "config.json").exists() and (p / "final" / "config.json").exists():
        return str(p / "final")
    return str(spec)


def load_reward_model(spec: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, eval_mode: bool = True):
    """(model, tokenizer). A causal-LM checkpoint (e.g. the SFT model) gets a new, zero-
    initialised scalar head: every reply starts at reward 0, so early training is driven
    by the backbone's features rather than by a random head."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    r = models.resolve_spec(resolve_reward_spec(spec))
    tok = models.load_tokenizer(r.path)
    config = AutoConfig.from_pretrained(r.path)
    fresh_head = not any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    model = AutoModelForSequenceClassification.from_pretrained(r.path, num_labels=1, dtype=dtype)
    if model.get_input_embeddings().num_embeddings < len(tok):
        model.resize_token_embeddings(len(tok))
    model.config.pad_token_id = tok.pad_token_id
    if fresh_head:
        torch.nn.init.zeros_(model.score.weight)
        setattr(model.config, OFFSET_KEY, 0.0)
    model.to(device)
    if eval_mode:
        model.eval()
    model.loopchat_load_info = {"spec": str(spec), "path": r.path, "converted": r.converted}
    return model, tok


# ----------------------------------------------------------------------------- data


@dataclass
class RankItem:
    """One ranking: K tokenised replies to one prompt and the pairs it orders."""

    prompt_ids: list[int]
    responses: list[list[int]]  # reply tokens + EOS, exactly as the policy produces them in PPO
    pairs: list[tuple[int, int]]  # (better, worse) indices into responses
    category: str = ""
    source: str = ""
    split: str = ""


def ranking_pairs(ranks: list[int]) -> list[tuple[int, int]]:
    """All (better, worse) pairs of a ranking given as a rank per reply (0 = best, equal =
    tie). C(K, 2) pairs without ties; tied replies form no pair."""
    return [(i, j) if ranks[i] < ranks[j] else (j, i) for i, j in combinations(range(len(ranks)), 2) if ranks[i] != ranks[j]]


def encode_reply(tok, prompt: list[dict], reply: str) -> tuple[list[int], list[int]]:
    """(prompt ids with the assistant header, reply ids + EOS). Tokenised the way PPO
    sees a rollout, so the reward model scores exactly the sequences it will be asked about."""
    p = models.apply_chat_template(tok, prompt, add_generation_prompt=True)
    return p, tok.encode(reply, add_special_tokens=False) + [tok.eos_token_id]


@dataclass
class RMDataSummary:
    files: list[str] = field(default_factory=list)
    rankings: int = 0
    used: int = 0
    pairs: int = 0
    skipped: Counter = field(default_factory=Counter)
    by_source: Counter = field(default_factory=Counter)

    def describe_skips(self) -> str:
        return ", ".join(f"{n} {why}" for why, n in self.skipped.most_common())


def rows_to_items(tok, rows, max_seq_len: int, summary: RMDataSummary, source: str) -> list[RankItem]:
    """Ranking rows ({"prompt", "responses", "ranks", ...}) -> RankItems; what cannot be
    learned from is counted in summary.skipped, never silently mangled."""
    out = []
    for row in rows:
        summary.rankings += 1
        ranks = row["ranks"]
        pairs = ranking_pairs(ranks)
        if not pairs:
            summary.skipped["all replies tied"] += 1
            continue
        try:
            enc = [encode_reply(tok, row["prompt"], r) for r in row["responses"]]
        except ValueError as e:
            summary.skipped[f"bad messages ({e})"] += 1
            continue
        p_ids = enc[0][0]
        if max(len(p_ids) + len(r) for _, r in enc) > max_seq_len:
            summary.skipped["longer than max_seq_len"] += 1
            continue
        if any(tok.pad_token_id in r for _, r in enc):
            summary.skipped["reply contains the pad token"] += 1
            continue
        out.append(RankItem(p_ids, [r for _, r in enc], pairs, str(row.get("category", "")), source, str(row.get("split", ""))))
        summary.used += 1
        summary.pairs += len(pairs)
        summary.by_source[source] += 1
    return out


def data_files(data: list[str]) -> list[Path]:
    """Ranking/preference files or folders; none = the bundled comparison set."""
    return jsonl_files(data, BUNDLED_COMPARISONS, "reward-model data")


def thumbs_rankings(records, feedback) -> list:
    """Add a ranking [thumbs-up replies] > [thumbs-down replies] for every set of sibling
    assistant replies that received both (net thumbs per reply), to store records."""
    net: dict[str, int] = defaultdict(int)
    for f in feedback:
        if f.thumbs:
            net[str(f.message_id)] += f.thumbs
    out = []
    for rec in records:
        kids = defaultdict(list)
        for n in rec.nodes:
            if n.role == "assistant" and net.get(n.id):
                kids[n.parent].append(n.id)
        for sibs in kids.values():
            up = [i for i in sibs if net[i] > 0]
            down = [i for i in sibs if net[i] < 0]
            if up and down:
                rec.rankings.append(RankingRecord([up, down], {"from": "thumbs"}))
        out.append(rec)
    return out


def load_rankings(tok, cfg: RMConfig, log=print) -> tuple[list[RankItem], RMDataSummary]:
    s = RMDataSummary()
    items: list[RankItem] = []
    for f in data_files(cfg.data):
        s.files.append(str(f))
        rows = [row for rec in read_file(f) for row in ranking_rows(rec)]
        items += rows_to_items(tok, rows, cfg.max_seq_len, s, source=f.name)
    if cfg.store:
        from loopchat.data.store import Store

        store = Store(cfg.db)
        recs = thumbs_rankings(list(store.export_records()), store.feedback())
        s.files.append(store.url)
        items += rows_to_items(tok, [row for rec in recs for row in ranking_rows(rec)], cfg.max_seq_len, s, source="store")
    return items, s


def make_collate(pad_id: int):
    def collate(items: list[RankItem]) -> dict:
        """Every reply of every ranking once, right-padded; pairs index into that list."""
        seqs, better, worse = [], [], []
        for it in items:
            base = len(seqs)
            seqs += [it.prompt_ids + r for r in it.responses]
            better += [base + b for b, _ in it.pairs]
            worse += [base + w for _, w in it.pairs]
        L = max(len(x) for x in seqs)
        ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), L), dtype=torch.long)
        for i, x in enumerate(seqs):
            ids[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
        n_tok = int(mask.sum())
        return {
            "input_ids": ids, "attention_mask": mask,
            "better": torch.tensor(better, dtype=torch.long), "worse": torch.tensor(worse, dtype=torch.long),
            "num_units": len(better), "num_tokens": n_tok, "num_padding": ids.numel() - n_tok,
        }

    return collate


def pairwise_loss(r_better: torch.Tensor, r_worse: torch.Tensor) -> torch.Tensor:
    """SUM over pairs of -log sigmoid(r_better - r_worse) (the trainer divides by the pairs)."""
    return -F.logsigmoid(r_better - r_worse).sum()


def rm_loss(model, batch: dict) -> tuple[torch.Tensor, int, dict]:
    r = model(batch["input_ids"], batch["attention_mask"]).float()
    rb, rw = r[batch["better"]], r[batch["worse"]]
    loss = pairwise_loss(rb, rw)
    d = (rb - rw).detach()
    return loss, d.numel(), {"accuracy": float((d > 0).float().mean()), "margin": float(d.mean())}


# ----------------------------------------------------------------------------- scoring


@torch.no_grad()
def score_sequences(model, seqs: list[list[int]], pad_id: int, batch_size: int = 16, autocast: bool | None = None) -> list[float]:
    """Raw rewards of token sequences (prompt + reply), longest first to pad little.
    autocast: bf16 autocast; None = where the device runs bf16 natively."""
    device = next(model.parameters()).device
    autocast = use_bf16(autocast, device)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    out = [0.0] * len(seqs)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else torch.autocast(device.type, enabled=False)
    for k in range(0, len(order), batch_size):
        idx = order[k : k + batch_size]
        batch = make_collate(pad_id)([RankItem([], [seqs[i]], [(0, 0)]) for i in idx])
        batch = to_device(batch, device)
        with ctx:
            r = gather_last(token_scores(model, batch["input_ids"], batch["attention_mask"]), batch["attention_mask"])
        for i, v in zip(idx, r.float().tolist()):
            out[i] = v
    return out


def score_replies(model, tok, prompts: list[list[dict]], replies: list[str], normalise: bool = True, batch_size: int = 16,
                  autocast: bool | None = None) -> list[float]:
    """Rewards of replies to prompts (normalised by the checkpoint's offset unless told not)."""
    seqs = []
    for p, r in zip(prompts, replies):
        a, b = encode_reply(tok, p, r)
        seqs.append(a + b)
    raw = score_sequences(model, seqs, tok.pad_token_id, batch_size, autocast)
    off = reward_offset(model) if normalise else 0.0
    return [x - off for x in raw]


def demonstration_pairs(files: list[Path], n: int, seed: int) -> list[tuple[list[dict], str]]:
    """(prompt, final assistant reply) of a seeded sample of n demonstrations."""
    out = []
    for f in files:
        for rec in read_file(f):
            for path in sft_messages(rec):
                out.append((path[:-1], path[-1]["content"]))
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(out), generator=g).tolist()[:n]
    return [out[i] for i in sorted(perm)]


# ----------------------------------------------------------------------------- training


class RewardTrainer(Trainer):
    plot_panels = {"loss": ["loss", "eval_loss"], "pairwise accuracy": ["accuracy", "eval_accuracy"], "learning rate": ["lr"]}

    def __init__(self, cfg: RMConfig, model, tokenizer, demos: list[tuple[list[dict], str]]):
        super().__init__(cfg, model, tokenizer, kind="rm")
        self.model = ScoreModel(self.model)  # after LoRA (applied by Trainer) and before prepare
        self.demos = demos

    def hf_model(self):
        return self.accelerator.unwrap_model(self.model).hf

    def export_model(self):
        return self.hf_model()

    def compute_offset(self) -> float:
        """Mean raw reward of the demonstrations (sharded over processes)."""
        hf = self.hf_model()
        was = hf.training
        hf.eval()
        mine = self.demos[self.accelerator.process_index :: self.world]
        seqs = [sum(encode_reply(self.tokenizer, p, r), []) for p, r in mine]
        seqs = [s[-self.cfg.max_seq_len :] for s in seqs]  # keep the end: the reward is read there
        raw = score_sequences(hf, seqs, self.tokenizer.pad_token_id, autocast=self.bf16) if seqs else []
        hf.train(was)
        total, n = self.all_sum([sum(raw), len(raw)])
        return total / max(n, 1)

    def finish(self) -> Path:
        off = self.compute_offset()
        setattr(self.hf_model().config, OFFSET_KEY, off)
        self.log({"reward_offset": off})
        if self.is_main:
            print(f"[rm] normalisation offset {off:+.4f} (mean raw reward of {len(self.demos)} demonstrations; stored in config.json as {OFFSET_KEY})", flush=True)
        return super().finish()


def prepare_data(tok, cfg: RMConfig, log=print) -> tuple[list[RankItem], list[RankItem], dict]:
    items, s = load_rankings(tok, cfg, log)
    if not items:
        why = s.describe_skips() or "the files hold no rankings"
        raise ValueError(f"RM: no usable rankings in {', '.join(s.files)}: {why}")
    held = [it for it in items if it.split in ("heldout", "test", "eval")]
    if held:  # the data's own held-out split (the bundled set has one)
        train = [it for it in items if it.split not in ("heldout", "test", "eval")]
        eval_ = held
    else:
        train, eval_ = split_eval(items, cfg.eval_fraction, cfg.seed)
    if not train:
        raise ValueError("RM: every ranking is in the held-out split; nothing to train on")
    k = Counter(len(it.responses) for it in items)
    summary = {
        "files": s.files, "rankings": s.rankings, "used": s.used, "pairs": s.pairs,
        "skipped": dict(s.skipped), "by_source": dict(s.by_source), "K": dict(sorted(k.items())),
        "train_rankings": len(train), "eval_rankings": len(eval_),
        "train_pairs": sum(len(it.pairs) for it in train), "eval_pairs": sum(len(it.pairs) for it in eval_),
        "train_forward_passes": sum(len(it.responses) for it in train),
    }
    skipped = sum(s.skipped.values())
    log(
        f"[rm] {s.rankings} rankings from {len(s.files)} source(s): {s.used} used ({len(train)} train / {len(eval_)} held out), "
        f"{skipped} skipped" + (f" [{s.describe_skips()}]" if skipped else "")
    )
    log(
        f"[rm] {summary['train_pairs']} training pairs from {summary['train_forward_passes']} replies "
        f"(K = {', '.join(f'{a}: {b}' for a, b in summary['K'].items())}): each reply goes through the model once per epoch"
    )
    return train, eval_, summary


def run_rm(cfg: RMConfig) -> Path:
    """Train a reward model from cfg.model (usually the SFT checkpoint); returns the run folder."""
    log = print if is_main_process() else (lambda *a, **k: None)
    model, tok = load_reward_model(cfg.model, eval_mode=False)
    train, eval_, summary = prepare_data(tok, cfg, log)
    from loopchat.train.sft import data_files as demo_files

    demos = demonstration_pairs(demo_files(cfg.offset_data), cfg.offset_samples, cfg.seed)
    if not demos:
        raise ValueError("RM: no demonstrations to measure the normalisation offset (see --offset-data)")
    trainer = RewardTrainer(cfg, model, tok, demos)
    if trainer.is_main:
        (trainer.run_dir / "data_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    trainer.fit(train, eval_, make_collate(tok.pad_token_id), rm_loss)
    log(f"[rm] done: {trainer.run_dir / 'final'}")
    return trainer.run_dir
