"""PPO's inputs and rollouts: the prompt set, the sampler, and the token layout.

Prompts. The bundled set (loopchat/data/bundled/prompts/*.jsonl, lines {"id", "category",
"messages"}) or the given files, plus the user turns of the store's conversations. Any
messages file works: a conversation is cut after its last user turn. Prompts longer than
max_prompt_len tokens are skipped (counted). The kept set is written to the run folder
(prompts.jsonl) and always read back from there, so every process and a resumed run see
exactly the same prompts in the same order, even if the store has grown meanwhile.

Layout. Each rollout is one row [pad..pad prompt | response pad..pad]: the prompt is
left-padded and the response right-padded to the widest of the batch, so every response
starts in the same column P. The attention mask covers both real parts; position ids are
cumsum(mask) - 1, so a padded row sees the positions it would see alone. The response is
the sampled tokens plus EOS when the model stopped (Completion.token_ids excludes the EOS,
but the EOS is an action too: without it in the loss the model never learns to stop).

    logits at column t predict the token at column t + 1, so the response token j (column
    P + j) is predicted at column P - 1 + j, and its value is read there too.
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from loopchat import models
from loopchat.generate import Completion, Generator, SamplingParams
from loopchat.train.reward import position_ids_from_mask  # noqa: F401  (part of the layout; tests use it from here)

BUNDLED_PROMPTS = Path(__file__).resolve().parent.parent / "data" / "bundled" / "prompts"


# ----------------------------------------------------------------------------- prompts


def _prompt_from(messages, where: str) -> list[dict]:
    """The conversation up to and including its last user turn."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: message {i} must be {{'role': system|user|assistant, 'content': str}}, got {m!r}")
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not users:
        return []
    return [{"role": m["role"], "content": m["content"]} for m in messages[: users[-1] + 1]]


def prompt_files(paths: list[str]) -> list[Path]:
    """Files to read: each entry a file or a folder of *.jsonl; none = the bundled prompts."""
    from loopchat.train.loop import jsonl_files

    return jsonl_files(paths, BUNDLED_PROMPTS, "PPO prompts")


def read_prompts(path: Path) -> list[dict]:
    """{"id", "category", "messages"} per line, and optionally "split" (heldout = kept for
    evaluation) and "keep" (terms that state the fact a reply must hold to: PPO's fact rule);
    a line without a user turn is skipped."""
    from loopchat.data.formats import iter_jsonl

    out = []
    for where, line, obj in iter_jsonl(path):
        if "messages" not in obj:
            raise ValueError(f"{where}: expected an object with 'messages'")
        msgs = _prompt_from(obj["messages"], where)
        keep = obj.get("keep")
        if keep is not None and (not isinstance(keep, list) or not keep or not all(isinstance(t, str) and t.strip() for t in keep)):
            raise ValueError(f"{where}: 'keep' must be a non-empty list of non-empty strings (the terms that state the fact to keep), got {keep!r}")
        if msgs:
            p = {"id": str(obj.get("id", f"{Path(path).name}:{line}")), "category": str(obj.get("category", "")), "messages": msgs,
                 "split": str(obj.get("split", "train"))}
            out.append({**p, "keep": keep} if keep else p)
    return out


def store_prompts(db: str | None) -> list[dict]:
    """Every user turn of the store's conversations, with what came before it. A store that
    does not exist yet is not created (an empty list)."""
    import sqlalchemy as sa

    from loopchat import paths

    url = db or paths.default_db_url()
    u = sa.engine.make_url(url)
    if u.get_backend_name() == "sqlite" and u.database not in (None, "", ":memory:") and not Path(u.database).exists():
        return []
    from loopchat.data.store import Store

    out = []
    with Store(url) as store:
        for rec in store.export_records():
            by_id = {n.id: n for n in rec.nodes}
            for node in rec.nodes:
                if node.role != "user":
                    continue
                path, cur = [], node
                while cur is not None and len(path) <= len(rec.nodes):  # (the bound guards against a cycle)
                    path.append({"role": cur.role, "content": cur.content})
                    cur = by_id.get(cur.parent) if cur.parent is not None else None
                out.append({"id": f"store:{node.id}", "category": str(rec.meta.get("category", "store")), "messages": path[::-1]})
    return out


def collect_prompts(tok, files: list[str], use_store: bool, db: str | None, max_prompt_len: int) -> tuple[list[dict], dict]:
    """(prompts, summary): files (or the bundled set) + the store, deduplicated, each with
    its token count; prompts over max_prompt_len tokens are skipped and counted."""
    items, sources = [], Counter()
    for f in prompt_files(files):
        got = read_prompts(f)
        items += [{**p, "source": f.name} for p in got]
        sources[f.name] += len(got)
    if use_store:
        got = store_prompts(db)
        items += [{**p, "source": "store"} for p in got]
        sources["store"] += len(got)
    seen, kept, skipped = set(), [], Counter()
    for p in items:
        if p.get("split") == "heldout":  # kept for evaluation (loopchat eval winrate), never trained on
            skipped["held out for evaluation"] += 1
            continue
        key = json.dumps(p["messages"], sort_keys=True)
        if key in seen:
            skipped["duplicate"] += 1
            continue
        seen.add(key)
        n = len(models.apply_chat_template(tok, p["messages"]))
        if n > max_prompt_len:
            skipped["longer than max_prompt_len"] += 1
            continue
        kept.append({**p, "tokens": n})
    summary = {
        "sources": dict(sources), "prompts": len(kept), "skipped": dict(skipped),
        "categories": dict(Counter(p["category"] for p in kept)),
    }
    return kept, summary


def write_prompts(path: Path, prompts: list[dict]) -> None:
    from loopchat.train.loop import write_text_atomic

    write_text_atomic(Path(path), "".join(json.dumps(p) + "\n" for p in prompts))


def load_prompt_snapshot(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- sampling


class PolicySampler:
    """loopchat.generate over the policy. The fast CPU decoder reads plain Llama weights, so a
    LoRA policy is sampled from a merged copy (merged again at every refresh). Call refresh()
    after every optimisation phase: the fast decoder keeps its own bf16 copy of the weights."""

    def __init__(self, policy, tok, backend: str = "auto"):
        self.policy, self.tok = policy, tok
        self.lora = hasattr(policy, "merge_and_unload")
        self.gen = Generator(self._plain(), tok, backend=backend)

    def _plain(self):
        if self.lora:  # a copy: merging in place and unmerging would perturb the weights
            return copy.deepcopy(self.policy).merge_and_unload().eval()
        return self.policy

    def refresh(self) -> None:
        if self.lora:
            self.gen.model = self._plain()
        self.gen.refresh()

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[Completion]:
        was = self.policy.training
        self.policy.eval()
        try:
            return [c[0] for c in self.gen.generate(prompt_ids, params)]
        finally:
            self.policy.train(was)


def response_tokens(c: Completion, eos_id: int) -> list[int]:
    """The actions of one rollout: sampled tokens, plus EOS if the model stopped by itself."""
    return list(c.token_ids) + ([eos_id] if c.finish_reason == "stop" else [])


# ----------------------------------------------------------------------------- layout


@dataclass
class Rollouts:
    """A batch of N rollouts in the layout of the module docstring. Per-token tensors over the
    response (rewards, log-probs, values, advantages) are [N, R] with the same columns as
    `response`."""

    input_ids: torch.Tensor  # [N, P + R]
    attention_mask: torch.Tensor  # [N, P + R]
    position_ids: torch.Tensor  # [N, P + R]
    response_mask: torch.Tensor  # [N, R] float, 1 on response tokens (incl. EOS)
    ended: torch.Tensor  # [N] bool: the response ends with EOS
    prompt_width: int  # P

    @property
    def response(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_width :]

    def __len__(self) -> int:
        return self.input_ids.size(0)

    def select(self, rows) -> dict:
        """A model-ready micro-batch of these rows, with the all-padding columns at both ends
        cut off (no compute on them): input_ids, attention_mask, position_ids, response
        [n, r], response_mask [n, r], n_resp = r, and the cut ([:, :r] of any [N, R] tensor)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        am = self.attention_mask[rows]
        P = self.prompt_width
        first = int(am[:, :P].argmax(1).min())  # leftmost real prompt column
        r = int(self.response_mask[rows].sum(1).max())
        cols = slice(first, P + r)
        return {
            "input_ids": self.input_ids[rows, cols], "attention_mask": am[:, cols], "position_ids": self.position_ids[rows, cols],
            "response": self.input_ids[rows, P : P + r], "response_mask": self.response_mask[rows, :r], "n_resp": r, "rows": rows,
        }


def build_rollouts(prompts: list[list[int]], responses: list[list[int]], pad_id: int, eos_id: int) -> Rollouts:
    """Lay out prompt and response token lists (see the module docstring)."""
    if len(prompts) != len(responses) or not prompts:
        raise ValueError("need as many responses as prompts, at least one")
    if any(not r for r in responses):
        raise ValueError("every response needs at least one token (the sampler emits one, EOS or not)")
    N, P, R = len(prompts), max(len(p) for p in prompts), max(len(r) for r in responses)
    ids = torch.full((N, P + R), pad_id, dtype=torch.long)
    am = torch.zeros((N, P + R), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, P - len(p) : P] = torch.tensor(p)
        ids[i, P : P + len(r)] = torch.tensor(r)
        am[i, P - len(p) : P + len(r)] = 1
    ended = torch.tensor([r[-1] == eos_id for r in responses])
    return Rollouts(ids, am, position_ids_from_mask(am), am[:, P:].float(), ended, P)
