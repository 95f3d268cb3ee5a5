"""Dataset files in and out: every format is read into ConversationRecord trees and written from them.

Formats (Hugging Face Hub / TRL conventions):

* ``messages``     JSONL ``{"messages": [{"role", "content"}, ...], ...extra keys -> record.meta}``
* ``preference``   JSONL (TRL): ``{"prompt", "chosen", "rejected"}`` in conversational form (lists of
                   messages) or standard form (strings); also TRL's implicit-prompt form
                   ``{"chosen": [full conversation], "rejected": [full conversation]}``
* ``prompt-completion`` JSONL (TRL): ``{"prompt", "completion"}``, strings or lists of messages (read only)
* ``ranking``      JSONL (ours): ``{"prompt": [messages], "responses": [str, ...], "ranks": [0, 1, 1, 2]}``
* ``hh-rlhf``      Anthropic transcripts ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}`` (read only)
* ``oasst``        OpenAssistant ``*.trees.jsonl`` or flat messages JSONL (read only)
* ``ultrafeedback`` HuggingFaceH4/ultrafeedback_binarized rows (read only)

Files may be gzip-compressed (detected by content) and, if ``pyarrow`` is installed, parquet.
Reading is strict: the first malformed line raises ``FormatError`` naming the file, the 1-based
line and the field. ``read_file(..., strict=False)`` skips bad lines instead and lists them in
``result.skipped``.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import uuid
from collections import defaultdict
from itertools import combinations
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from .records import ROLES, ConversationRecord, Node, RankingRecord

FORMATS = ("messages", "prompt-completion", "preference", "ranking", "hh-rlhf", "oasst", "ultrafeedback")
WRITABLE_FORMATS = ("messages", "preference", "ranking")

__all__ = [
    "FORMATS",
    "WRITABLE_FORMATS",
    "FormatError",
    "ReadResult",
    "detect_format",
    "read_file",
    "write_file",
    "import_file",
    "export_file",
    "to_messages",
    "sft_messages",
    "ranking_rows",
]


class FormatError(ValueError):
    """A dataset file does not match its format. The message names file, line and field."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None, field: str | None = None):
        super().__init__(message)
        self.path = path
        self.line = line
        self.field = field


class ReadResult(list):
    """The records read from a file (a plain list), plus what was left out.

    ``skipped``: error messages of lines skipped with ``strict=False``.
    ``deleted``: OpenAssistant messages skipped because they, or an ancestor, are marked deleted.
    """

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.skipped: list[str] = []
        self.deleted: int = 0


# --------------------------------------------------------------------------- locations & checks


class _Loc:
    """Where a row came from: the file and its 1-based line (or parquet row)."""

    __slots__ = ("path", "line", "unit")

    def __init__(self, path: str, line: int, unit: str = "line"):
        self.path, self.line, self.unit = path, line, unit

    def error(self, field: str | None, message: str) -> FormatError:
        where = f"{self.path} {self.unit} {self.line}"
        text = f"{where}: field {field}: {message}" if field else f"{where}: {message}"
        return FormatError(text, path=self.path, line=self.line, field=field)


def _q(key: str) -> str:
    return json.dumps(key, ensure_ascii=False)


def _jtype(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _show(value: Any) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _get(obj: dict, key: str, loc: _Loc, field: str) -> Any:
    if key not in obj:
        raise loc.error(field, "missing")
    return obj[key]


def _expect(value: Any, typ: type | tuple, loc: _Loc, field: str, what: str) -> Any:
    if not isinstance(value, typ) or (isinstance(value, bool) and bool not in (typ if isinstance(typ, tuple) else (typ,))):
        raise loc.error(field, f"expected {what}, got {_jtype(value)}")
    return value


def _text(value: Any, loc: _Loc, field: str, *, allow_empty: bool = False) -> str:
    _expect(value, str, loc, field, "a string")
    if not allow_empty and not value.strip():
        raise loc.error(field, "must not be empty")
    return value


def _rank(value: Any, loc: _Loc, field: str) -> int | None:
    """OASST ranks: int, integral float (HF parquet stores float64), null or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise loc.error(field, f"expected a non-negative integer or null, got {_show(value)}")
    return value


_Msg = tuple  # (role, content, extra_keys_dict)


def _parse_messages(value: Any, loc: _Loc, field: str) -> list[_Msg]:
    _expect(value, list, loc, field, "a list of messages")
    if not value:
        raise loc.error(field, "must not be an empty list")
    out = []
    for i, m in enumerate(value):
        f = f"{field}[{i}]"
        _expect(m, dict, loc, f, 'an object with "role" and "content"')
        role = _get(m, "role", loc, f + ".role")
        if role not in ROLES:
            raise loc.error(f + ".role", f"expected one of {'/'.join(ROLES)}, got {_show(role)}")
        content = _text(_get(m, "content", loc, f + ".content"), loc, f + ".content", allow_empty=role == "system")
        out.append((role, content, {k: v for k, v in m.items() if k not in ("role", "content")}))
    return out


def _prompt_messages(value: Any, loc: _Loc, field: str) -> list[_Msg]:
    """A prompt: a string (one user message) or a non-empty list of messages."""
    if isinstance(value, str):
        return [("user", _text(value, loc, field), {})]
    if not isinstance(value, list):
        raise loc.error(field, f"expected a string or a list of messages, got {_jtype(value)}")
    return _parse_messages(value, loc, field)


def _completion_messages(value: Any, loc: _Loc, field: str) -> list[_Msg]:
    """A completion: a string (one assistant message) or a list of messages starting with an assistant turn."""
    if isinstance(value, str):
        return [("assistant", _text(value, loc, field), {})]
    if not isinstance(value, list):
        raise loc.error(field, f"expected a string or a list of messages, got {_jtype(value)}")
    msgs = _parse_messages(value, loc, field)
    if msgs[0][0] != "assistant":
        raise loc.error(f"{field}[0].role", f'expected "assistant" (earlier turns belong in "prompt"), got {_show(msgs[0][0])}')
    return msgs


def _split_common(a: list[_Msg], b: list[_Msg], loc: _Loc, fa: str, fb: str) -> tuple[list[_Msg], list[_Msg], list[_Msg]]:
    """Split two full conversations into (shared prompt, continuation a, continuation b).

    The prompt is the longest common prefix of turns; both continuations must start with
    differing assistant turns (so the ranking orders sibling assistant replies).
    """
    k = 0
    while k < len(a) and k < len(b) and a[k][:2] == b[k][:2]:
        k += 1
    if k == len(a) and k == len(b):
        raise loc.error(f"{fa}/{fb}", "the two conversations are identical")
    if k == len(a) or k == len(b):
        raise loc.error(f"{fa}/{fb}", "one conversation is a prefix of the other; nothing to compare")
    for msgs, f in ((a, fa), (b, fb)):
        if msgs[k][0] != "assistant":
            raise loc.error(
                f"{f}[{k}].role",
                f"the conversations first differ at turn {k}, which must be an assistant turn, got {_show(msgs[k][0])}",
            )
    if k == 0:
        raise loc.error(f"{fa}/{fb}", "the conversations share no prompt")
    return a[:k], a[k:], b[k:]


class _Builder:
    def __init__(self) -> None:
        self.nodes: list[Node] = []

    def add(self, parent: str | None, role: str, content: str, meta: dict | None = None) -> str:
        nid = str(len(self.nodes))
        self.nodes.append(Node(nid, parent, role, content, dict(meta or {})))
        return nid

    def chain(self, parent: str | None, msgs: list[_Msg]) -> list[str]:
        ids = []
        for role, content, extra in msgs:
            parent = self.add(parent, role, content, extra)
            ids.append(parent)
        return ids


def _pair_record(prompt: list[_Msg], chosen: list[_Msg], rejected: list[_Msg], source: str, meta: dict, ranking_meta: dict | None = None) -> ConversationRecord:
    b = _Builder()
    ids = b.chain(None, prompt)
    parent = ids[-1] if ids else None
    c = b.chain(parent, chosen)
    r = b.chain(parent, rejected)
    return ConversationRecord(b.nodes, [RankingRecord([[c[0]], [r[0]]], dict(ranking_meta or {}))], source=source, meta=meta)


def _extras(obj: dict, reserved: Iterable[str]) -> dict:
    reserved = set(reserved)
    return {k: v for k, v in obj.items() if k not in reserved}


# --------------------------------------------------------------------------- raw rows


def _display(path: Path) -> str:
    return str(path)


def _iter_rows(path: Path) -> Iterator[tuple[_Loc, Any]]:
    """Yield (location, parsed object or FormatError) for each non-blank line / parquet row."""
    name = _display(path)
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq  # optional
        except ImportError:
            raise FormatError(f"{name}: reading parquet needs the optional package pyarrow", path=name) from None
        for i, row in enumerate(pq.read_table(path).to_pylist(), 1):
            yield _Loc(name, i, "row"), row
        return
    with open(path, "rb") as fh:
        gz = fh.read(2) == b"\x1f\x8b"
    opener = gzip.open if gz else open
    with opener(path, "rb") as fh:
        for i, raw in enumerate(fh, 1):
            loc = _Loc(name, i)
            try:
                text = raw.decode("utf-8-sig" if i == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield loc, loc.error(None, f"not valid UTF-8 ({e.reason} at byte {e.start})")
                continue
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                yield loc, loc.error(None, f"invalid JSON: {e.msg} (column {e.colno})")
                continue
            if not isinstance(obj, dict):
                yield loc, loc.error(None, f"expected a JSON object, got {_jtype(obj)}")
                continue
            yield loc, obj


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[str, int, dict]]:
    """("file:line", line, object) for each non-blank line of a JSONL file (gzipped or not); a
    line that is not a UTF-8 JSON object raises FormatError naming the file and line."""
    path = Path(path)
    for loc, obj in _iter_rows(path):
        if isinstance(obj, FormatError):
            raise obj
        yield f"{path}:{loc.line}", loc.line, obj


def _check(rec: ConversationRecord, loc: _Loc) -> ConversationRecord:
    try:
        rec.validate()
    except ValueError as e:
        raise loc.error(None, str(e)) from None
    return rec


# --------------------------------------------------------------------------- per-format row parsers


def _row_messages(obj: dict, loc: _Loc) -> ConversationRecord:
    msgs = _parse_messages(_get(obj, "messages", loc, _q("messages")), loc, _q("messages"))
    b = _Builder()
    b.chain(None, msgs)
    return ConversationRecord(b.nodes, [], source="messages", meta=_extras(obj, ["messages"]))


def _row_prompt_completion(obj: dict, loc: _Loc) -> ConversationRecord:
    if "label" in obj:  # TRL's unpaired preference (KTO): a completion may be a bad example
        raise loc.error(_q("label"), "unpaired preference rows (prompt, completion, label) are not supported: use preference pairs or rankings")
    prompt = _prompt_messages(_get(obj, "prompt", loc, _q("prompt")), loc, _q("prompt"))
    completion = _completion_messages(_get(obj, "completion", loc, _q("completion")), loc, _q("completion"))
    b = _Builder()
    b.chain(None, prompt + completion)
    return ConversationRecord(b.nodes, [], source="prompt-completion", meta=_extras(obj, ["prompt", "completion"]))


def _row_preference(obj: dict, loc: _Loc) -> ConversationRecord:
    fc, fr = _q("chosen"), _q("rejected")
    chosen_raw = _get(obj, "chosen", loc, fc)
    rejected_raw = _get(obj, "rejected", loc, fr)
    if "prompt" in obj:
        prompt = _prompt_messages(obj["prompt"], loc, _q("prompt"))
        chosen = _completion_messages(chosen_raw, loc, fc)
        rejected = _completion_messages(rejected_raw, loc, fr)
    else:  # TRL implicit prompt: full conversations, the shared prefix is the prompt
        prompt, chosen, rejected = _split_common(
            _parse_messages(chosen_raw, loc, fc), _parse_messages(rejected_raw, loc, fr), loc, fc, fr
        )
    return _pair_record(prompt, chosen, rejected, "preference", _extras(obj, ["prompt", "chosen", "rejected"]))


def _row_ranking(obj: dict, loc: _Loc) -> ConversationRecord:
    fp, fs, fk = _q("prompt"), _q("responses"), _q("ranks")
    prompt = _prompt_messages(_get(obj, "prompt", loc, fp), loc, fp)
    responses = _expect(_get(obj, "responses", loc, fs), list, loc, fs, "a list of strings")
    if len(responses) < 2:
        raise loc.error(fs, f"expected at least 2 responses, got {len(responses)}")
    texts = [_text(r, loc, f"{fs}[{i}]") for i, r in enumerate(responses)]
    ranks = _expect(_get(obj, "ranks", loc, fk), list, loc, fk, "a list of integers")
    if len(ranks) != len(texts):
        raise loc.error(fk, f"has {len(ranks)} entries but {fs} has {len(texts)}")
    for i, r in enumerate(ranks):
        if not isinstance(r, int) or isinstance(r, bool) or r < 0:
            raise loc.error(f"{fk}[{i}]", f"expected a non-negative integer (0 = best), got {_show(r)}")
    b = _Builder()
    ids = b.chain(None, prompt)
    ids = [b.add(ids[-1], "assistant", t) for t in texts]
    groups = [[nid for nid, r in zip(ids, ranks) if r == level] for level in sorted(set(ranks))]
    return ConversationRecord(b.nodes, [RankingRecord(groups)], source="ranking", meta=_extras(obj, ["prompt", "responses", "ranks"]))


def _hh_turns(value: Any, loc: _Loc, field: str) -> list[_Msg]:
    """Parse an hh-rlhf transcript "\\n\\nHuman: ...\\n\\nAssistant: ..." into turns."""
    text = _text(value, loc, field)
    text = "\n\n" + text.lstrip()  # quirk: the leading "\n\n" is sometimes missing or padded
    turns: list[_Msg] = []
    markers = (("\n\nHuman:", "user"), ("\n\nAssistant:", "assistant"))

    def next_marker(start: int) -> tuple[int, str, int]:
        best = (-1, "", 0)
        for m, role in markers:
            j = text.find(m, start)
            if j != -1 and (best[0] == -1 or j < best[0]):
                best = (j, role, len(m))
        return best

    j, role, mlen = next_marker(0)
    if j != 0:
        raise loc.error(field, 'expected the transcript to start with "Human:" or "Assistant:"')
    while j != -1:
        start = j + mlen
        nj, nrole, nmlen = next_marker(start)
        content = text[start: nj if nj != -1 else len(text)].strip()
        turns.append((role, content, {}))
        j, role, mlen = nj, nrole, nmlen
    for i, (role, content, _) in enumerate(turns):
        if not content:
            which = "final" if i == len(turns) - 1 else f"turn {i}"
            speaker = "Human" if role == "user" else "Assistant"
            raise loc.error(field, f'{which} "{speaker}:" reply is empty')
    return turns


def _row_hh(obj: dict, loc: _Loc) -> ConversationRecord:
    fc, fr = _q("chosen"), _q("rejected")
    chosen = _hh_turns(_get(obj, "chosen", loc, fc), loc, fc)
    rejected = _hh_turns(_get(obj, "rejected", loc, fr), loc, fr)
    for turns, f in ((chosen, fc), (rejected, fr)):
        if turns[-1][0] != "assistant":
            raise loc.error(f, 'expected the transcript to end with an "Assistant:" turn')
    prompt, c, r = _split_common(chosen, rejected, loc, fc, fr)
    return _pair_record(prompt, c, r, "hh-rlhf", _extras(obj, ["chosen", "rejected"]))


def _row_ultrafeedback(obj: dict, loc: _Loc) -> ConversationRecord:
    fc, fr = _q("chosen"), _q("rejected")
    chosen = _parse_messages(_get(obj, "chosen", loc, fc), loc, fc)
    rejected = _parse_messages(_get(obj, "rejected", loc, fr), loc, fr)
    if "prompt" in obj:
        _expect(obj["prompt"], str, loc, _q("prompt"), "a string")
    scores = {}
    for key in ("score_chosen", "score_rejected"):
        if obj.get(key) is not None:
            scores[key] = _expect(obj[key], (int, float), loc, _q(key), "a number")
    prompt, c, r = _split_common(chosen, rejected, loc, fc, fr)
    meta = _extras(obj, ["prompt", "chosen", "rejected", "messages", "score_chosen", "score_rejected"])
    return _pair_record(prompt, c, r, "ultrafeedback", meta, scores)


# --------------------------------------------------------------------------- OpenAssistant

_OASST_ROLES = {"prompter": "user", "assistant": "assistant"}
_OASST_NODE_META = ("lang", "rank", "review_result", "synthetic", "model_name")


def _oasst_fields(msg: Any, loc: _Loc, field: str) -> tuple[str, str, str, int | None, bool]:
    """Check one OASST message; ``field`` is its path in a trees file, "" for a flat messages row."""
    _expect(msg, dict, loc, field or "message", "a message object")

    def f(key: str) -> str:
        return f"{field}.{key}" if field else _q(key)

    mid = _text(_get(msg, "message_id", loc, f("message_id")), loc, f("message_id"))
    role = _get(msg, "role", loc, f("role"))
    if role not in _OASST_ROLES:
        raise loc.error(f("role"), f"expected one of prompter/assistant, got {_show(role)}")
    deleted = msg.get("deleted")
    deleted = False if deleted is None else _expect(deleted, bool, loc, f("deleted"), "a boolean")
    text = _expect(_get(msg, "text", loc, f("text")), str, loc, f("text"), "a string")
    if not deleted and not text.strip():
        raise loc.error(f("text"), "must not be empty")
    rank = _rank(msg.get("rank"), loc, f("rank"))
    return mid, _OASST_ROLES[role], text, rank, deleted


def _oasst_meta(msg: dict, rank: int | None) -> dict:
    meta = {k: msg[k] for k in _OASST_NODE_META if msg.get(k) is not None}
    if rank is not None:
        meta["rank"] = rank
    return meta


def _rank_siblings(children: list[Node]) -> RankingRecord | None:
    ranked = [n for n in children if n.role == "assistant" and n.meta.get("rank") is not None]
    if len(ranked) < 2:
        return None
    levels = sorted({n.meta["rank"] for n in ranked})
    return RankingRecord([[n.id for n in ranked if n.meta["rank"] == lv] for lv in levels])


def _count_tree(msg: Any) -> int:
    n, stack = 0, [msg]
    while stack:
        m = stack.pop()
        n += 1
        if isinstance(m, dict) and isinstance(m.get("replies"), list):
            stack.extend(m["replies"])
    return n


def _row_oasst_tree(obj: dict, loc: _Loc, result: ReadResult) -> ConversationRecord | None:
    fp = _q("prompt")
    root = _get(obj, "prompt", loc, fp)
    nodes: list[Node] = []
    rankings: list[RankingRecord] = []
    deleted = 0

    def walk(msg: Any, parent: str | None, field: str) -> Node | None:
        nonlocal deleted
        mid, role, text, rank, is_deleted = _oasst_fields(msg, loc, field)
        if is_deleted:
            deleted += _count_tree(msg)
            return None
        node = Node(mid, parent, role, text, _oasst_meta(msg, rank))
        nodes.append(node)
        replies = msg.get("replies") or []
        _expect(replies, list, loc, field + ".replies", "a list of messages")
        kids = [k for i, r in enumerate(replies) if (k := walk(r, mid, f"{field}.replies[{i}]")) is not None]
        ranking = _rank_siblings(kids)
        if ranking:
            rankings.append(ranking)
        return node

    # nesting depth of real trees is small (< 30); recursion is fine
    top = walk(root, None, fp)
    result.deleted += deleted
    if top is None:
        return None
    if top.role != "user":
        raise loc.error(fp + ".role", 'expected "prompter" for the root message, got "assistant"')
    meta = {k: obj[k] for k in ("message_tree_id", "tree_state") if obj.get(k) is not None}
    if root.get("lang") is not None:
        meta["lang"] = root["lang"]
    return _check(ConversationRecord(nodes, rankings, source="oasst", meta=meta), loc)


def _read_oasst_messages(rows: Iterable[tuple[_Loc, Any]], result: ReadResult, strict: bool) -> None:
    """Flat OASST message rows -> one record per message_tree_id (order of first appearance)."""

    def bad(err: FormatError) -> None:
        if strict:
            raise err
        result.skipped.append(str(err))

    entries: dict[str, tuple[_Loc, dict, tuple]] = {}
    trees: dict[str, list[str]] = {}
    for loc, obj in rows:
        try:
            if isinstance(obj, FormatError):
                raise obj
            fields = _oasst_fields(obj, loc, "")
            mid = fields[0]
            tree = _text(_get(obj, "message_tree_id", loc, _q("message_tree_id")), loc, _q("message_tree_id"))
            parent = _get(obj, "parent_id", loc, _q("parent_id"))
            if parent is not None:
                _text(parent, loc, _q("parent_id"))
            if mid in entries:
                raise loc.error(_q("message_id"), f"duplicate message id {_show(mid)} (first on line {entries[mid][0].line})")
        except FormatError as e:
            bad(e)
            continue
        entries[mid] = (loc, obj, fields)
        trees.setdefault(tree, []).append(mid)

    for tree_id, ids in trees.items():
        children: dict[str, list[str]] = defaultdict(list)
        roots = []
        try:
            for mid in ids:
                loc, obj, _ = entries[mid]
                parent = obj["parent_id"]
                if parent is None:
                    roots.append(mid)
                    if len(roots) > 1:
                        raise loc.error(_q("parent_id"), f"tree {_show(tree_id)} has a second root message (first on line {entries[roots[0]][0].line})")
                elif parent in entries and entries[parent][1]["message_tree_id"] == tree_id:
                    children[parent].append(mid)
                elif parent in entries:
                    raise loc.error(_q("parent_id"), f"parent {_show(parent)} belongs to another message_tree_id")
                elif strict:
                    raise loc.error(_q("parent_id"), f"unknown parent message {_show(parent)}")
                else:
                    result.skipped.append(str(loc.error(_q("parent_id"), f"unknown parent message {_show(parent)}")))
            if not roots:
                loc = entries[ids[0]][0]
                raise loc.error(_q("message_tree_id"), f"tree {_show(tree_id)} has no root message (parent_id null)")
        except FormatError as e:
            bad(e)
            continue

        nodes: list[Node] = []
        rankings: list[RankingRecord] = []
        reached = set()
        deleted = 0
        stack: list[tuple[str, bool]] = [(roots[0], False)]
        kids_of: dict[str, list[Node]] = defaultdict(list)
        while stack:  # iterative DFS, children in file order; deleted subtrees skipped
            mid, under_deleted = stack.pop()
            reached.add(mid)
            loc, obj, (_, role, text, rank, is_deleted) = entries[mid]
            gone = under_deleted or is_deleted
            if gone:
                deleted += 1
            else:
                node = Node(mid, obj["parent_id"], role, text, _oasst_meta(obj, rank))
                nodes.append(node)
                if node.parent is not None:
                    kids_of[node.parent].append(node)
            stack.extend((c, gone) for c in reversed(children[mid]))
        result.deleted += deleted
        root_loc = entries[roots[0]][0]
        try:
            for mid in ids:
                if mid in reached or entries[mid][1]["parent_id"] not in entries:
                    continue  # orphans were reported above
                err = entries[mid][0].error(_q("parent_id"), "message is not connected to its tree's root")
                if strict:
                    raise err  # with orphans already rejected, only a parent cycle gets here
                result.skipped.append(str(err))  # e.g. below an orphan: skip it, keep the tree
            if not nodes:
                continue
            if nodes[0].role != "user":
                raise root_loc.error(_q("role"), 'expected "prompter" for the root message, got "assistant"')
            for n in nodes:
                r = _rank_siblings(kids_of.get(n.id, []))
                if r:
                    rankings.append(r)
            root_obj = entries[roots[0]][1]
            meta = {"message_tree_id": tree_id}
            if root_obj.get("lang") is not None:
                meta["lang"] = root_obj["lang"]
            result.append(_check(ConversationRecord(nodes, rankings, source="oasst", meta=meta), root_loc))
        except FormatError as e:
            bad(e)


# --------------------------------------------------------------------------- detection & reading

_ROW_PARSERS: dict[str, Callable[[dict, _Loc], ConversationRecord]] = {
    "messages": _row_messages,
    "prompt-completion": _row_prompt_completion,
    "preference": _row_preference,
    "ranking": _row_ranking,
    "hh-rlhf": _row_hh,
    "ultrafeedback": _row_ultrafeedback,
}


def _detect_obj(obj: dict) -> str | None:
    keys = set(obj)
    if {"chosen", "rejected"} <= keys and keys & {"prompt_id", "score_chosen", "score_rejected", "messages"}:
        return "ultrafeedback"
    if "message_tree_id" in keys and isinstance(obj.get("prompt"), dict):
        return "oasst"
    if "message_id" in keys and "role" in keys and "text" in keys:
        return "oasst"
    if {"responses", "ranks"} <= keys:
        return "ranking"
    if {"chosen", "rejected"} <= keys:
        if "prompt" in keys or not isinstance(obj["chosen"], str):
            return "preference"
        return "hh-rlhf"
    if "messages" in keys:
        return "messages"
    if {"prompt", "completion"} <= keys:
        return "prompt-completion"
    return None


def _first_row(path: Path) -> tuple[_Loc, Any]:
    for loc, obj in _iter_rows(path):
        return loc, obj
    raise FormatError(f"{_display(path)}: no records", path=_display(path))


def detect_format(path: str | os.PathLike) -> str:
    """Name the format of a file from the keys of its first record."""
    path = Path(path)
    loc, obj = _first_row(path)
    if isinstance(obj, FormatError):
        raise obj
    fmt = _detect_obj(obj)
    if fmt is None:
        raise loc.error(None, f"unknown format: keys {sorted(obj)} match none of {', '.join(FORMATS)}")
    return fmt


def read_file(path: str | os.PathLike, fmt: str | None = None, *, strict: bool = True) -> ReadResult:
    """Read a dataset file into ConversationRecords (a ReadResult, which is a list).

    ``fmt`` None detects the format. Strict by default: the first bad line raises FormatError.
    With ``strict=False`` bad lines are skipped and described in ``result.skipped``.
    """
    path = Path(path)
    if fmt is None:
        fmt = detect_format(path)
    if fmt not in FORMATS:
        raise FormatError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    result = ReadResult()
    if fmt == "oasst":
        loc, first = _first_row(path)
        if isinstance(first, dict) and "prompt" in first and "message_id" not in first:
            parse = lambda obj, loc: _row_oasst_tree(obj, loc, result)  # noqa: E731  trees file
        else:
            _read_oasst_messages(_iter_rows(path), result, strict)
            parse = None
    else:
        parse = _ROW_PARSERS[fmt]
    if parse is not None:
        for loc, obj in _iter_rows(path):
            try:
                if isinstance(obj, FormatError):
                    raise obj
                rec = parse(obj, loc)
                if rec is not None:
                    result.append(_check(rec, loc))
            except FormatError as e:
                if strict:
                    raise
                result.skipped.append(str(e))
    if not result:
        detail = f" ({len(result.skipped)} bad lines skipped)" if result.skipped else ""
        if result.deleted:
            detail += f" ({result.deleted} deleted messages skipped)"
        raise FormatError(f"{_display(path)}: no records{detail}", path=_display(path))
    return result


# --------------------------------------------------------------------------- trees -> messages


def _index(record: ConversationRecord) -> tuple[dict[str, Node], dict[str | None, list[Node]]]:
    by_id = {n.id: n for n in record.nodes}
    kids: dict[str | None, list[Node]] = defaultdict(list)
    for n in record.nodes:
        kids[n.parent if n.parent in by_id else None].append(n)
    return by_id, kids


def _msg(n: Node) -> dict:
    return {"role": n.role, "content": n.content}


def _worse_than_best(record: ConversationRecord) -> set[str]:
    out = set()
    for r in record.rankings:
        for g in r.groups[1:]:
            out.update(g)
    return out


def to_messages(record: ConversationRecord, *, best_only: bool = False, assistant_last: bool = False) -> Iterator[list[dict]]:
    """Yield each root-to-leaf path of the tree as a messages list ``[{"role", "content"}, ...]``.

    ``best_only`` drops paths through a node that a ranking places below its best group
    (tied-best alternatives are all kept); ``assistant_last`` keeps only paths ending in an
    assistant message. ``sft_messages`` turns both on.
    """
    _, kids = _index(record)
    skip = _worse_than_best(record) if best_only else set()
    stack: list[tuple[Node, list[dict]]] = [(n, []) for n in reversed(kids[None]) if n.id not in skip]
    seen: set[str] = set()
    while stack:
        node, prefix = stack.pop()
        if node.id in seen:  # defensive: a malformed cycle
            continue
        seen.add(node.id)
        path = prefix + [_msg(node)]
        children = kids.get(node.id, [])
        if not children:
            if not assistant_last or node.role == "assistant":
                yield path
            continue
        kept = [c for c in children if c.id not in skip]
        stack.extend((c, path) for c in reversed(kept))


def sft_messages(record: ConversationRecord) -> Iterator[list[dict]]:
    """What SFT learns from: paths ending in an assistant reply, best-ranked alternatives only."""
    return to_messages(record, best_only=True, assistant_last=True)


def _path_to(node_id: str | None, by_id: dict[str, Node]) -> list[dict]:
    out, seen = [], set()
    while node_id is not None and node_id in by_id and node_id not in seen:
        seen.add(node_id)
        n = by_id[node_id]
        out.append(_msg(n))
        node_id = n.parent
    return out[::-1]


def _rankings_with_prompt(record: ConversationRecord) -> Iterator[tuple[RankingRecord, list[dict], dict[str, Node]]]:
    """Rankings over sibling assistant replies, each with its prompt (root..parent)."""
    by_id, _ = _index(record)
    for r in record.rankings:
        flat = [i for g in r.groups for i in g]
        if not flat or any(i not in by_id or by_id[i].role != "assistant" for i in flat):
            continue  # e.g. OASST rankings of prompter replies: not a response ranking
        prompt = _path_to(by_id[flat[0]].parent, by_id)
        if prompt:
            yield r, prompt, by_id


def _write_messages(rec: ConversationRecord) -> Iterator[dict]:
    extra = _extras(rec.meta, ["messages"])
    for path in sft_messages(rec):
        yield {"messages": path, **extra}


def _write_preference(rec: ConversationRecord) -> Iterator[dict]:
    extra = _extras(rec.meta, ["prompt", "chosen", "rejected"])
    for r, prompt, by_id in _rankings_with_prompt(rec):
        for better, worse in combinations(r.groups, 2):
            for a in better:
                for b in worse:
                    yield {"prompt": prompt, "chosen": [_msg(by_id[a])], "rejected": [_msg(by_id[b])], **extra}


def _write_ranking(rec: ConversationRecord) -> Iterator[dict]:
    extra = _extras(rec.meta, ["prompt", "responses", "ranks"])
    order = {n.id: i for i, n in enumerate(rec.nodes)}
    for r, prompt, by_id in _rankings_with_prompt(rec):
        level = {i: g for g, group in enumerate(r.groups) for i in group}
        ids = sorted(level, key=order.__getitem__)  # keep the responses in the record's order
        yield {"prompt": prompt, "responses": [by_id[i].content for i in ids], "ranks": [level[i] for i in ids], **extra}


def ranking_rows(rec: ConversationRecord) -> Iterator[dict]:
    """Each response ranking of a record as ``{"prompt", "responses", "ranks", ...meta}``:
    the reward model's view of any source (ranking files, preference pairs, OASST, the store)."""
    return _write_ranking(rec)


_WRITERS: dict[str, Callable[[ConversationRecord], Iterator[dict]]] = {
    "messages": _write_messages,
    "preference": _write_preference,
    "ranking": _write_ranking,
}


def write_file(records: Iterable[ConversationRecord], path: str | os.PathLike, fmt: str) -> int:
    """Write records as JSONL in ``fmt`` (messages, preference or ranking); return lines written.

    Writes a temporary file beside ``path`` and renames it into place, so ``path`` is never
    left half-written. A name ending in ``.gz`` is gzip-compressed.
    """
    if fmt not in _WRITERS:
        raise FormatError(f"cannot write format {fmt!r}; writable formats: {', '.join(WRITABLE_FORMATS)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    writer = _WRITERS[fmt]
    lines = 0
    try:
        with open(tmp, "xb") as raw:
            out = gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) if path.name.endswith(".gz") else raw
            for i, rec in enumerate(records):
                try:
                    rec.validate()
                    chunk = "".join(json.dumps(obj, ensure_ascii=False) + "\n" for obj in writer(rec))
                except (ValueError, TypeError) as e:
                    raise ValueError(f"record {i}: {e}") from e
                if chunk:
                    out.write(chunk.encode("utf-8"))
                    lines += chunk.count("\n")  # json.dumps escapes newlines: one per line
            if out is not raw:
                out.close()
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return lines


# --------------------------------------------------------------------------- store


def import_file(store: Any, path: str | os.PathLike, fmt: str | None = None, *, user_id: int | None = None) -> Any:
    """Parse the whole file, then import it with ONE ``store.import_records`` call (all or nothing)."""
    records = read_file(path, fmt)
    return store.import_records(list(records), user_id=user_id)


def export_file(store: Any, path: str | os.PathLike, fmt: str, *, conversation_ids: list[int] | None = None) -> int:
    """Write the store's conversations (all, or ``conversation_ids``) to ``path``; return lines written."""
    return write_file(store.export_records(conversation_ids), path, fmt)
