"""`loopchat chat`: a multi-turn terminal chat that streams, regenerates, and saves everything.

The conversation is a path in a message tree in the store: each turn appends to the
current leaf; /regen adds a sibling of the last assistant message (an alternative that can
later be ranked), and the history the model sees is always the path from root to leaf.
"""

from __future__ import annotations

import sys
from typing import TextIO

from pydantic import Field

from loopchat.config import Config

HELP = "commands: /regen  another answer to your last message · /reset  new conversation · /quit  leave · /help"


class ChatConfig(Config):
    model: str = Field("default", description="model spec: 'default', a checkpoint folder, a .gguf file or a Hub id")
    system: str | None = Field(None, description="system prompt (default: the model's own)")
    max_new_tokens: int = Field(256, description="longest reply, in tokens")
    temperature: float = Field(0.7, description="sampling temperature (0 = greedy)")
    top_p: float = Field(0.9, description="nucleus sampling mass")
    seed: int | None = Field(None, description="random seed for reproducible replies")
    db: str | None = Field(None, description="store URL (default: SQLite under $LOOPCHAT_HOME/data)")
    user: str = Field("local", description="user name the conversation is saved under")


def fit_history(gen, messages: list[dict], max_new_tokens: int) -> list[dict]:
    """Drop the oldest turns (keeping any system message) until the prompt fits the context."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    rest = messages[len(system) :]
    while rest:
        ids = gen.encode(system + rest)
        if len(ids) + max_new_tokens <= gen.max_context:
            return system + rest
        # drop one user/assistant exchange from the front, never the newest user turn
        rest = rest[2:] if len(rest) > 2 else rest[-1:]
        if len(rest) == 1:
            if len(gen.encode(system + rest)) + max_new_tokens > gen.max_context:
                raise ValueError("your message alone is longer than the model's context; shorten it")
            return system + rest
    return system + rest


class ChatSession:
    """The state of one terminal conversation: its store ids and the current leaf."""

    def __init__(self, cfg: ChatConfig, gen, store, model_version_id: int | None = None):
        self.cfg, self.gen, self.store = cfg, gen, store
        self.user_id = store.user(cfg.user)
        self.model_version_id = model_version_id
        self.reset()

    def reset(self) -> None:
        self.conversation_id = self.store.new_conversation(self.user_id, source="cli", meta={"model": self.cfg.model})
        self.leaf: int | None = None
        if self.cfg.system:
            self.leaf = self.store.add_message(self.conversation_id, None, "system", self.cfg.system, user_id=self.user_id)

    def history(self) -> list[dict]:
        if self.leaf is None:
            return []
        return [{"role": m.role, "content": m.content} for m in self.store.thread(self.leaf)]

    def _reply(self, parent_id: int, out: TextIO) -> str:
        from loopchat.generate import SamplingParams

        c = self.cfg
        params = SamplingParams(max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_p=c.top_p, seed=c.seed)
        msgs = fit_history(self.gen, [{"role": m.role, "content": m.content} for m in self.store.thread(parent_id)], c.max_new_tokens)
        pieces = []
        for piece in self.gen.stream(msgs, params):
            pieces.append(piece)
            out.write(piece)
            out.flush()
        out.write("\n")
        text = "".join(pieces).strip()
        self.leaf = self.store.add_message(
            self.conversation_id, parent_id, "assistant", text, model_version_id=self.model_version_id, meta={"model": c.model}
        )
        return text

    def say(self, text: str, out: TextIO) -> str:
        uid = self.store.add_message(self.conversation_id, self.leaf, "user", text, user_id=self.user_id)
        self.leaf = uid
        return self._reply(uid, out)

    def regenerate(self, out: TextIO) -> str | None:
        if self.leaf is None:
            return None
        last = self.store.message(self.leaf)
        if last.role != "assistant":
            return None
        return self._reply(last.parent_id, out)


def run_chat(cfg: ChatConfig, inp: TextIO = sys.stdin, out: TextIO = sys.stdout) -> int:
    from loopchat import models
    from loopchat.data.store import Store
    from loopchat.generate import Generator

    store = Store(cfg.db)
    out.write(f"loading {cfg.model} ...\n")
    out.flush()
    model, tok = models.load(cfg.model)
    info = model.loopchat_load_info
    out.write(f"ready ({'converted GGUF, ' if info['converted'] else ''}{info['seconds']:.1f}s). {HELP}\n")
    session = ChatSession(cfg, Generator(model, tok), store)
    interactive = inp.isatty()
    while True:
        if interactive:
            out.write("\nyou> ")
            out.flush()
        line = inp.readline()
        if not line:  # EOF / Ctrl-D
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit", "/q"):
            break
        if text == "/help":
            out.write(HELP + "\n")
            continue
        if text == "/reset":
            session.reset()
            out.write("(new conversation)\n")
            continue
        out.write("assistant> ")
        out.flush()
        if text in ("/regen", "/regenerate", "/r"):
            if session.regenerate(out) is None:
                out.write("(nothing to regenerate yet)\n")
            continue
        try:
            session.say(text, out)
        except ValueError as e:
            out.write(f"\n(error: {e})\n")
    out.write(f"saved as conversation {session.conversation_id} in {store.url}\n")
    store.close()
    return 0
