"""Batched sampling with a KV cache, K samples per prompt, stop strings and UTF-8-safe streaming.

One decoding loop serves everything: the chat (one prompt, streamed), the K alternatives
that people rank (one prompt, K samples), PPO rollouts (many prompts, log-probs needed)
and evaluation (greedy). transformers gives us the model forward and the KV cache; we own
the loop because we need per-row stop strings, streaming, sampling log-probs and
row-dropping as sequences finish, which `generate` does not give together.

Left padding: prompts are right-aligned so every row's next token sits in the last
column; position ids come from the attention mask (cumsum - 1), so a padded row sees the
same positions as the prompt alone and greedy output does not depend on the batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from loopchat.models import apply_chat_template


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.7  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means off
    stop: Sequence[str] = ()
    seed: int | None = None
    num_samples: int = 1  # K completions per prompt
    ignore_eos: bool = False  # keep going past EOS (benchmarks: a fixed number of tokens)

    def validate(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if isinstance(self.stop, str) or any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    logprobs: list[float] = field(default_factory=list)  # of each sampled token, at the sampling temperature
    prompt_tokens: int = 0


class IncrementalDecoder:
    """Turns a growing list of token ids into text pieces that never split a UTF-8 character.

    Byte-level BPE can put half of a multi-byte character in one token; decoding then ends
    in U+FFFD. We decode a small window (prefix_offset..end) and only release text once it
    does not end in U+FFFD (the approach of text-generation-inference).
    """

    def __init__(self, tok: PreTrainedTokenizerBase):
        self.tok = tok
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        full = self.tok.decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            new = full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return new
        return ""


class StopChecker:
    """Finds the earliest stop string in a row's text; also says how much text is safe to
    stream (a tail that could be the start of a stop string is held back)."""

    def __init__(self, stops: Sequence[str]):
        self.stops = list(stops)

    def find(self, text: str) -> int:
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return min(hits) if hits else -1

    def safe_len(self, text: str) -> int:
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return len(text) - hold


def sample_next(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row. Returns (token ids [B], their log-probs [B] at the temperature).

    The log-prob is taken from the full temperature-scaled distribution (before top-k/top-p),
    which is what PPO recomputes; use top_p=1, top_k=0 for rollouts so the two agree.
    """
    logits = logits.float()
    if p.temperature == 0:
        tokens = logits.argmax(-1)
        return tokens, torch.log_softmax(logits, -1).gather(-1, tokens[:, None])[:, 0]
    logits = logits / p.temperature
    logprobs = torch.log_softmax(logits, -1)
    filtered = logits
    if p.top_k > 0:
        kth = torch.topk(filtered, min(p.top_k, filtered.size(-1)), dim=-1).values[:, -1:]
        filtered = filtered.masked_fill(filtered < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, idx = torch.sort(filtered, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, -1)
        # drop a token once the mass before it already reaches top_p (always keep the first)
        drop = (probs.cumsum(-1) - probs) >= p.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        filtered = torch.full_like(filtered, float("-inf")).scatter(-1, idx, sorted_logits)
    probs = torch.softmax(filtered, -1)
    tokens = torch.multinomial(probs, 1, generator=gen)[:, 0]
    return tokens, logprobs.gather(-1, tokens[:, None])[:, 0]


class _HFEngine:
    """The model's own forward with transformers' DynamicCache: any architecture, any device."""

    def __init__(self, model):
        self.model, self.cache = model, DynamicCache()

    def forward(self, input_ids, attn, pos):
        out = self.model(input_ids=input_ids, attention_mask=attn, position_ids=pos, past_key_values=self.cache, use_cache=True)
        return out.logits[:, -1]

    def select_rows(self, keep):
        self.cache.batch_select_indices(keep)


class _FastEngine:
    """loopchat.fastdecode on CPU for Llama-family models (bf16, static cache)."""

    def __init__(self, fast, batch: int, max_len: int):
        self.fast = fast
        fast.reset(batch, max_len)

    def forward(self, input_ids, attn, pos):
        return self.fast.forward(input_ids, pos, attn.bool())

    def select_rows(self, keep):
        self.fast.select_rows(keep)


class Generator:
    """Batched sampling for one model. `max_context` defaults to the model's own limit.

    backend: "auto" uses loopchat.fastdecode (bf16, ~2x faster) for Llama-family models on
    CPU and the transformers forward otherwise; "hf" forces transformers; "fast" insists on
    the fast decoder. After training the model in place, call refresh() so the fast decoder
    picks up the new weights.
    """

    def __init__(self, model: PreTrainedModel, tok: PreTrainedTokenizerBase, max_context: int | None = None,
                 backend: str = "auto", fast_dtype: torch.dtype | None = None):
        from loopchat import fastdecode

        self.model = model
        self.tok = tok
        if backend not in ("auto", "hf", "fast"):
            raise ValueError(f"backend must be auto, hf or fast, got {backend!r}")
        on_cpu = next(model.parameters()).device.type == "cpu"
        use_fast = backend == "fast" or (backend == "auto" and on_cpu and fastdecode.supports(model))
        if use_fast and not on_cpu:
            raise ValueError("the fast backend runs on CPU; use backend='hf' on GPU")
        self.fast = fastdecode.FastLlama(model, dtype=fast_dtype or fastdecode.default_dtype()) if use_fast else None
        self.backend = "fast" if use_fast else "hf"
        self.max_context = max_context or getattr(model.config, "max_position_embeddings", 2048)
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        eos_ids.add(tok.eos_token_id)
        self.eos_ids = sorted(i for i in eos_ids if i is not None)
        if tok.pad_token_id is None or tok.pad_token_id in self.eos_ids:
            raise ValueError("tokenizer needs a pad token distinct from EOS (load it through loopchat.models.load)")

    def refresh(self) -> None:
        """Reload the fast decoder's weights from the (trained) model."""
        if self.fast is not None:
            self.fast.load_weights(self.model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---- prompts -------------------------------------------------------------------------
    def encode(self, prompt: list[dict] | list[int] | str) -> list[int]:
        """A chat (list of messages) goes through the chat template; a str is raw text; ids pass."""
        if isinstance(prompt, str):
            return self.tok.encode(prompt, add_special_tokens=False)
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        if isinstance(prompt, list):
            return apply_chat_template(self.tok, prompt)
        raise TypeError(f"a prompt must be a list of messages, a list of token ids or a string, got {type(prompt).__name__}")

    def _encode_all(self, prompts, p: SamplingParams) -> list[list[int]]:
        """Encode prompts and check each fits the context with its reply budget."""
        enc = [self.encode(x) for x in prompts]
        for index, ids in enumerate(enc):
            if not ids:
                raise ValueError(f"prompt {index} is empty")
            if len(ids) + p.max_new_tokens > self.max_context:
                raise ValueError(
                    f"prompt {index} is {len(ids)} tokens; with max_new_tokens={p.max_new_tokens} that exceeds "
                    f"the model's context of {self.max_context} tokens: shorten the prompt or max_new_tokens"
                )
        return enc

    # ---- the decoding loop -----------------------------------------------------------------
    @torch.inference_mode()
    def _decode_loop(self, prompts: list[list[int]], p: SamplingParams, on_tokens) -> Iterator[None]:
        """Run the model step by step; after each step call on_tokens(row ids, new tokens, their
        log-probs) for the rows still running (it returns a bool mask of rows that hit a stop
        string) and yield, so a caller can stream.

        Finished rows are dropped from the batch (and from the KV cache), so a long tail of
        one slow sample does not pay for the whole batch.
        """
        dev = self.device
        gen = None
        if p.seed is not None:
            gen = torch.Generator(device=dev).manual_seed(p.seed)
        B = len(prompts)
        L = max(len(x) for x in prompts)
        input_ids = torch.full((B, L), self.tok.pad_token_id, dtype=torch.long)
        attn = torch.zeros((B, L), dtype=torch.long)
        for i, x in enumerate(prompts):
            input_ids[i, L - len(x) :] = torch.tensor(x)
            attn[i, L - len(x) :] = 1
        input_ids, attn = input_ids.to(dev), attn.to(dev)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        rows = torch.arange(B, device=dev)
        eos = torch.tensor([] if p.ignore_eos else self.eos_ids, dtype=torch.long, device=dev)
        engine = self._engine(B, L + p.max_new_tokens)
        logits = engine.forward(input_ids, attn, pos)
        next_pos = pos[:, -1:] + 1
        for _ in range(p.max_new_tokens):
            tokens, lps = sample_next(logits, p, gen)
            done = on_tokens(rows, tokens, lps).to(dev) | torch.isin(tokens, eos)
            yield
            if done.all():
                return
            if done.any():
                keep = (~done).nonzero()[:, 0]
                rows, tokens, attn, next_pos = rows[keep], tokens[keep], attn[keep], next_pos[keep]
                engine.select_rows(keep)
            attn = torch.cat([attn, attn.new_ones((attn.size(0), 1))], dim=1)
            logits = engine.forward(tokens[:, None], attn, next_pos)
            next_pos = next_pos + 1

    def _engine(self, batch: int, max_len: int):
        if self.fast is not None:
            return _FastEngine(self.fast, batch, max_len)
        return _HFEngine(self.model)

    def generate(self, prompts: Sequence[list[dict] | list[int] | str], params: SamplingParams | None = None) -> list[list[Completion]]:
        """Sample params.num_samples completions for each prompt: result[i][k]."""
        p = params or SamplingParams()
        p.validate()
        if isinstance(prompts, (str, dict)) or not isinstance(prompts, Sequence):
            raise TypeError("prompts must be a list of prompts (each a list of messages, token ids or a string)")
        if not prompts:
            return []
        enc = self._encode_all(prompts, p)
        rows = [ids for ids in enc for _ in range(p.num_samples)]  # K copies of each prompt, adjacent
        out_ids: list[list[int]] = [[] for _ in rows]
        out_lps: list[list[float]] = [[] for _ in rows]
        texts: list[str | None] = [None] * len(rows)
        reasons = ["length"] * len(rows)
        stopper = StopChecker(p.stop)
        # with stop strings, each row's text grows through an IncrementalDecoder, so a step
        # decodes a few tokens instead of the whole reply again
        decoders = [IncrementalDecoder(self.tok) for _ in rows] if stopper.stops else []
        partial = [""] * len(rows)
        eos = set() if p.ignore_eos else set(self.eos_ids)

        def on_tokens(row_ids: torch.Tensor, tokens: torch.Tensor, lps: torch.Tensor) -> torch.Tensor:
            done = torch.zeros(len(row_ids), dtype=torch.bool, device=tokens.device)
            for j, (r, t, lp) in enumerate(zip(row_ids.tolist(), tokens.tolist(), lps.tolist())):
                if t in eos:
                    reasons[r] = "stop"
                    continue
                out_ids[r].append(t)
                out_lps[r].append(lp)
                if stopper.stops:
                    partial[r] += decoders[r].push(t)
                    cut = stopper.find(partial[r])
                    if cut >= 0:
                        texts[r], reasons[r] = partial[r][:cut], "stop"
                        done[j] = True
            return done

        for _ in self._decode_loop(rows, p, on_tokens):
            pass
        result: list[list[Completion]] = []
        for i in range(len(enc)):
            group = []
            for k in range(p.num_samples):
                r = i * p.num_samples + k
                text = texts[r] if texts[r] is not None else self.tok.decode(out_ids[r], skip_special_tokens=True)
                group.append(Completion(text, out_ids[r], reasons[r], out_lps[r], len(enc[i])))
            result.append(group)
        return result

    def stream(self, prompt: list[dict] | list[int] | str, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield text pieces of one completion as they are decoded (never a split character,
        never part of a stop string)."""
        p = params or SamplingParams()
        p.validate()
        if p.num_samples != 1:
            raise ValueError("stream() produces one completion; use generate() for num_samples > 1")
        ids = self._encode_all([prompt], p)[0]
        dec = IncrementalDecoder(self.tok)
        stopper = StopChecker(p.stop)
        eos = set() if p.ignore_eos else set(self.eos_ids)
        state = {"text": "", "sent": 0, "stopped": False}

        def on_tokens(row_ids, tokens, lps):
            t = int(tokens[0])
            if t in eos:
                return torch.zeros(1, dtype=torch.bool)
            state["text"] += dec.push(t)
            cut = stopper.find(state["text"]) if stopper.stops else -1
            if cut >= 0:
                state["text"] = state["text"][:cut]
                state["stopped"] = True
                return torch.ones(1, dtype=torch.bool)
            return torch.zeros(1, dtype=torch.bool)

        for _ in self._decode_loop([ids], p, on_tokens):
            safe = len(state["text"]) if state["stopped"] else stopper.safe_len(state["text"])
            if safe > state["sent"]:
                yield state["text"][state["sent"] : safe]
                state["sent"] = safe
        if len(state["text"]) > state["sent"]:
            yield state["text"][state["sent"] :]
