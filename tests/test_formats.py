"""Dataset formats: readers on fixture files in each real format, writers, round trips, errors, store import/export."""

from __future__ import annotations

import gzip
import importlib.util
import json
import shutil
from math import comb
from pathlib import Path

import pytest

from loopchat.data.formats import (
    FORMATS,
    WRITABLE_FORMATS,
    FormatError,
    detect_format,
    export_file,
    import_file,
    read_file,
    sft_messages,
    to_messages,
    write_file,
)
from loopchat.data.records import ConversationRecord, Node, RankingRecord

FIX = Path(__file__).parent / "fixtures"


# --------------------------------------------------------------------------- helpers


def by_content(rec: ConversationRecord) -> dict[str, Node]:
    return {n.content: n for n in rec.nodes}


def chain(rec: ConversationRecord, node: Node) -> list[tuple[str, str]]:
    """(role, content) from the root down to node."""
    ids = {n.id: n for n in rec.nodes}
    out = []
    while node is not None:
        out.append((node.role, node.content))
        node = ids.get(node.parent) if node.parent is not None else None
    return out[::-1]


def ranking_contents(rec: ConversationRecord, r: RankingRecord) -> list[list[str]]:
    ids = {n.id: n for n in rec.nodes}
    return [sorted(ids[i].content for i in g) for g in r.groups]


def canon(rec: ConversationRecord) -> dict:
    """A form independent of local node ids: every path, every ranking by content, the meta."""
    return {
        "paths": sorted(json.dumps(p, ensure_ascii=False) for p in to_messages(rec)),
        "rankings": sorted(
            json.dumps([chain(rec, {n.id: n for n in rec.nodes}[r.groups[0][0]])[:-1], ranking_contents(rec, r)])
            for r in rec.rankings
        ),
        "meta": rec.meta,
    }


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


def gz_copy(src: Path, dst: Path) -> Path:
    with open(src, "rb") as f, gzip.open(dst, "wb") as g:
        shutil.copyfileobj(f, g)
    return dst


U = lambda c: {"role": "user", "content": c}  # noqa: E731
A = lambda c: {"role": "assistant", "content": c}  # noqa: E731


# --------------------------------------------------------------------------- readers on fixtures


def test_read_messages_fixture():
    recs = read_file(FIX / "messages.jsonl")
    assert len(recs) == 3
    r0 = recs[0]
    assert [(n.role, n.content) for n in r0.nodes] == [("system", "You are terse."), ("user", "What is 2+2?"), ("assistant", "4.")]
    assert [n.parent for n in r0.nodes] == [None, r0.nodes[0].id, r0.nodes[1].id]
    assert r0.meta == {"id": "m1", "category": "math"}
    assert r0.rankings == [] and r0.source == "messages"
    assert [n.role for n in recs[1].nodes] == ["user", "assistant", "user", "assistant"]
    assert recs[1].meta == {}
    assert recs[2].meta == {"category": "false_premise"}
    assert "Ça va? ☀" in recs[2].nodes[-1].content


def test_read_preference_conversational():
    recs = read_file(FIX / "preference.jsonl", "preference")
    assert len(recs) == 2
    r = recs[1]
    nodes = by_content(r)
    chosen, rejected = nodes["Très bien, merci."], nodes["I am fine."]
    assert chosen.role == rejected.role == "assistant"
    assert chosen.parent == rejected.parent == nodes["How are you?"].id
    assert chain(r, chosen)[:-1] == [("system", "Answer in French."), ("user", "Hello!"), ("assistant", "Bonjour !"), ("user", "How are you?")]
    assert len(r.rankings) == 1 and r.rankings[0].groups == [[chosen.id], [rejected.id]]
    assert r.meta == {"id": "p2"} and recs[0].meta == {}


def test_read_preference_standard_strings():
    recs = read_file(FIX / "preference_standard.jsonl")
    assert len(recs) == 2
    r = recs[0]
    assert [(n.role, n.content) for n in r.nodes] == [("user", "The sky is"), ("assistant", " blue."), ("assistant", " green.")]
    assert r.nodes[1].parent == r.nodes[2].parent == r.nodes[0].id
    assert r.rankings[0].groups == [[r.nodes[1].id], [r.nodes[2].id]]


def test_read_preference_implicit_prompt():
    (r,) = read_file(FIX / "preference_implicit.jsonl")
    assert [(n.role, n.content) for n in r.nodes] == [
        ("user", "Is water wet?"), ("assistant", "It makes other things wet."), ("assistant", "No.")]
    assert r.rankings[0].groups == [[r.nodes[1].id], [r.nodes[2].id]]


def test_read_prompt_completion_conversational_and_standard():
    recs = read_file(FIX / "prompt_completion.jsonl")
    assert [(n.role, n.content) for n in recs[0].nodes] == [("system", "Be brief."), ("user", "What is 2+2?"), ("assistant", "4.")]
    assert recs[0].meta == {"id": "pc1"} and recs[0].rankings == []
    assert list(sft_messages(recs[0])) == [[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}]]
    assert [(n.role, n.content) for n in recs[1].nodes] == [("user", "The capital of France is"), ("assistant", " Paris.")]


def test_prompt_completion_errors_name_the_field(tmp_path):
    bad = write_lines(tmp_path / "pc.jsonl", [{"prompt": "Hi", "completion": [{"role": "user", "content": "Hi again"}]}])
    with pytest.raises(FormatError, match=r'pc\.jsonl line 1: field "completion"\[0\]\.role: expected "assistant"'):
        read_file(bad)
    kto = write_lines(tmp_path / "kto.jsonl", [{"prompt": "Hi", "completion": "Go away.", "label": False}])
    with pytest.raises(FormatError, match=r'kto\.jsonl line 1: field "label": unpaired preference'):
        read_file(kto)


def test_read_ranking_with_ties():
    recs = read_file(FIX / "ranking.jsonl")
    r = recs[0]
    assert r.meta == {"category": "math", "id": "r1"}
    assert ranking_contents(r, r.rankings[0]) == [["2: its only divisors are 1 and 2."], ["11", "7"], ["9 is prime."]]
    prompt = by_content(r)["Name a prime number and say why it is prime."]
    answers = [n for n in r.nodes if n.role == "assistant"]
    assert len(answers) == 4 and all(n.parent == prompt.id for n in answers)
    r2 = recs[1]
    assert [n.role for n in r2.nodes] == ["system", "user", "assistant", "assistant"]
    assert ranking_contents(r2, r2.rankings[0]) == [["Hi there!"], ["hi"]]


def test_read_hh_rlhf():
    recs = read_file(FIX / "hh_rlhf.jsonl")
    assert len(recs) == 4 and all(r.source == "hh-rlhf" for r in recs)
    # single turn
    r = recs[0]
    assert [(n.role, n.content) for n in r.nodes][0] == ("user", "What are some cuss words in english?")
    assert ranking_contents(r, r.rankings[0]) == [
        ["I'd rather not list insults, but I can explain why people swear."], ["Here’s an incomplete list: ..."]]
    # multi-turn, shared prefix of 3 turns, final assistant turns differ
    r = recs[1]
    n = by_content(r)
    good, bad = n["About an hour, until doubled."], n["A week."]
    assert good.parent == bad.parent == n["How long should it rise?"].id
    assert [role for role, _ in chain(r, good)] == ["user", "assistant", "user", "assistant"]
    assert len(r.nodes) == 5
    # earlier turns differ: prompt is the common prefix, the continuations are whole chains
    r = recs[2]
    n = by_content(r)
    first_c, first_r = n["Why did the chicken cross the road?"], n["No."]
    assert first_c.parent == first_r.parent == n["Tell me a joke."].id
    assert r.rankings[0].groups == [[first_c.id], [first_r.id]]
    assert chain(r, n["To get to the other side."])[1:] == [
        ("assistant", "Why did the chicken cross the road?"), ("user", "Why?"), ("assistant", "To get to the other side.")]
    assert chain(r, n["I don't feel like it."])[1:] == [("assistant", "No."), ("user", "Why?"), ("assistant", "I don't feel like it.")]
    # missing leading "\n\n"
    r = recs[3]
    assert [(n.role, n.content) for n in r.nodes] == [("user", "Hi"), ("assistant", "Hello! How can I help?"), ("assistant", "What.")]


def test_read_hh_rlhf_gz(tmp_path):
    recs = read_file(gz_copy(FIX / "hh_rlhf.jsonl", tmp_path / "train.jsonl.gz"))
    assert [canon(r) for r in recs] == [canon(r) for r in read_file(FIX / "hh_rlhf.jsonl")]


def _check_oasst(recs):
    assert len(recs) == 2  # tree t3 has a deleted root: skipped whole
    t1, t2 = recs
    assert t1.meta["message_tree_id"] == "t1-p" and t1.meta["lang"] == "en" and t1.source == "oasst"
    ids = {n.id: n for n in t1.nodes}
    assert set(ids) == {"t1-p", "t1-a1", "t1-a2", "t1-u2", "t1-a4"}  # t1-a3 deleted with its reply t1-u3
    assert ids["t1-p"].role == "user" and ids["t1-p"].parent is None
    assert ids["t1-a1"].parent == ids["t1-a2"].parent == "t1-p"
    assert (ids["t1-u2"].role, ids["t1-u2"].parent) == ("user", "t1-a1")
    assert (ids["t1-a4"].content, ids["t1-a4"].parent) == ("Rome.", "t1-u2")
    assert [r.groups for r in t1.rankings] == [[["t1-a1"], ["t1-a2"]]]
    assert [(n.role, n.content) for n in t2.nodes] == [("user", "¿Qué hora es?"), ("assistant", "No tengo reloj.")]
    assert t2.rankings == [] and t2.meta["lang"] == "es"
    assert recs.deleted == 4  # t1-a3 + t1-u3, t3-p + t3-a1


def test_read_oasst_trees():
    recs = read_file(FIX / "oasst.trees.jsonl")
    _check_oasst(recs)


def test_read_oasst_messages_flat_out_of_order():
    recs = read_file(FIX / "oasst.messages.jsonl")
    _check_oasst(recs)
    trees = read_file(FIX / "oasst.trees.jsonl")
    assert [[(n.id, n.parent, n.role, n.content) for n in r.nodes] for r in recs] == [
        [(n.id, n.parent, n.role, n.content) for n in r.nodes] for r in trees]


@pytest.mark.parametrize("name", ["oasst.trees.jsonl", "oasst.messages.jsonl"])
def test_read_oasst_gz(tmp_path, name):
    recs = read_file(gz_copy(FIX / name, tmp_path / (name + ".gz")), "oasst")
    _check_oasst(recs)


def test_read_oasst_tied_ranks(tmp_path):
    p = write_lines(tmp_path / "m.jsonl", [
        {"message_id": "p", "parent_id": None, "message_tree_id": "p", "role": "prompter", "text": "q", "rank": None},
        {"message_id": "a", "parent_id": "p", "message_tree_id": "p", "role": "assistant", "text": "x", "rank": 0},
        {"message_id": "b", "parent_id": "p", "message_tree_id": "p", "role": "assistant", "text": "y", "rank": 1},
        {"message_id": "c", "parent_id": "p", "message_tree_id": "p", "role": "assistant", "text": "z", "rank": 1},
        {"message_id": "d", "parent_id": "p", "message_tree_id": "p", "role": "assistant", "text": "w", "rank": None},
    ])
    (r,) = read_file(p)
    assert r.rankings[0].groups == [["a"], ["b", "c"]]  # unranked "d" is not in the ranking
    assert {n.id for n in r.nodes} == {"p", "a", "b", "c", "d"}


def test_read_ultrafeedback():
    recs = read_file(FIX / "ultrafeedback.jsonl")
    assert len(recs) == 2
    r = recs[0]
    assert [(n.role, n.content) for n in r.nodes][:1] == [("user", "Write a haiku about rain.")]
    assert len(r.nodes) == 3
    assert ranking_contents(r, r.rankings[0]) == [
        ["Soft rain on the roof\nwhispers to the sleeping town\npuddles hold the sky"], ["Rain is wet. It falls."]]
    assert r.rankings[0].meta == {"score_chosen": 9.0, "score_rejected": 4.5}
    assert r.meta == {"prompt_id": "a1b2c3"} and r.source == "ultrafeedback"


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="pyarrow not installed (optional)")
def test_read_ultrafeedback_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (FIX / "ultrafeedback.jsonl").read_text(encoding="utf-8").splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train_prefs.parquet")
    recs = read_file(tmp_path / "train_prefs.parquet", "ultrafeedback")
    assert [canon(r) for r in recs] == [canon(r) for r in read_file(FIX / "ultrafeedback.jsonl")]


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is not None, reason="pyarrow is installed")
def test_parquet_without_pyarrow_is_a_clear_error(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    with pytest.raises(FormatError, match=r"x\.parquet: reading parquet needs .*pyarrow"):
        read_file(tmp_path / "x.parquet", "ultrafeedback")


def test_oasst_flat_orphans_and_cycles(tmp_path):
    rows = [
        {"message_id": "p", "parent_id": None, "message_tree_id": "p", "role": "prompter", "text": "q"},
        {"message_id": "a", "parent_id": "p", "message_tree_id": "p", "role": "assistant", "text": "x"},
        {"message_id": "o", "parent_id": "gone", "message_tree_id": "p", "role": "assistant", "text": "orphan"},
        {"message_id": "o2", "parent_id": "o", "message_tree_id": "p", "role": "prompter", "text": "below orphan"},
    ]
    p = write_lines(tmp_path / "orph.jsonl", rows)
    with pytest.raises(FormatError, match=r'orph\.jsonl line 3: field "parent_id": unknown parent message "gone"'):
        read_file(p)
    recs = read_file(p, strict=False)
    assert [n.id for n in recs[0].nodes] == ["p", "a"] and len(recs.skipped) == 2
    cyc = rows[:2] + [
        {"message_id": "c1", "parent_id": "c2", "message_tree_id": "p", "role": "assistant", "text": "c1"},
        {"message_id": "c2", "parent_id": "c1", "message_tree_id": "p", "role": "prompter", "text": "c2"},
    ]
    with pytest.raises(FormatError, match=r'cyc\.jsonl line 3: field "parent_id": message is not connected'):
        read_file(write_lines(tmp_path / "cyc.jsonl", cyc))


@pytest.mark.parametrize("name,fmt", [
    ("messages.jsonl", "messages"),
    ("prompt_completion.jsonl", "prompt-completion"),
    ("preference.jsonl", "preference"),
    ("preference_standard.jsonl", "preference"),
    ("preference_implicit.jsonl", "preference"),
    ("ranking.jsonl", "ranking"),
    ("hh_rlhf.jsonl", "hh-rlhf"),
    ("oasst.trees.jsonl", "oasst"),
    ("oasst.messages.jsonl", "oasst"),
    ("ultrafeedback.jsonl", "ultrafeedback"),
])
def test_detect_format(name, fmt):
    assert detect_format(FIX / name) == fmt
    assert fmt in FORMATS


def test_detect_unknown_and_unknown_fmt(tmp_path):
    p = write_lines(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(FormatError, match=r"odd\.jsonl line 1: unknown format.*question"):
        detect_format(p)
    with pytest.raises(FormatError, match="unknown format 'alpaca'"):
        read_file(FIX / "messages.jsonl", "alpaca")


# --------------------------------------------------------------------------- writers & round trips


@pytest.mark.parametrize("name,fmt", [
    ("messages.jsonl", "messages"),
    ("preference.jsonl", "preference"),
    ("preference_standard.jsonl", "preference"),
    ("ranking.jsonl", "ranking"),
])
def test_round_trip(tmp_path, name, fmt):
    recs = read_file(FIX / name, fmt)
    n = write_file(recs, tmp_path / "out.jsonl", fmt)
    assert n == len(recs)
    again = read_file(tmp_path / "out.jsonl", fmt)
    assert [canon(r) for r in again] == [canon(r) for r in recs]
    if fmt != "preference" or name == "preference.jsonl":  # the string form is written back conversational
        assert [json.loads(x) for x in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()] == [
            json.loads(x) for x in (FIX / name).read_text(encoding="utf-8").splitlines()]


def test_written_json_is_utf8_not_escaped(tmp_path):
    write_file(read_file(FIX / "messages.jsonl"), tmp_path / "o.jsonl", "messages")
    text = (tmp_path / "o.jsonl").read_text(encoding="utf-8")
    assert "Ça va? ☀" in text and "\\u" not in text


def test_gz_output(tmp_path):
    recs = read_file(FIX / "ranking.jsonl")
    assert write_file(recs, tmp_path / "r.jsonl.gz", "ranking") == 2
    assert gzip.open(tmp_path / "r.jsonl.gz").read().startswith(b'{"prompt"')
    assert [canon(r) for r in read_file(tmp_path / "r.jsonl.gz")] == [canon(r) for r in recs]


def test_k4_ranking_with_tie_exports_pairs(tmp_path):
    (rec,) = read_file(write_lines(tmp_path / "k4.jsonl", [
        {"prompt": [U("q")], "responses": ["best", "mid-a", "mid-b", "worst"], "ranks": [0, 1, 1, 2]}]))
    n = write_file([rec], tmp_path / "pairs.jsonl", "preference")
    assert n == comb(4, 2) - comb(2, 2) == 5
    pairs = [json.loads(x) for x in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    got = sorted((p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs)
    assert got == sorted([("best", "mid-a"), ("best", "mid-b"), ("best", "worst"), ("mid-a", "worst"), ("mid-b", "worst")])
    assert all(p["prompt"] == [U("q")] for p in pairs)
    assert all(p["chosen"][0]["role"] == p["rejected"][0]["role"] == "assistant" for p in pairs)


def test_ranking_export_keeps_ties_and_order(tmp_path):
    (rec,) = read_file(write_lines(tmp_path / "k.jsonl", [
        {"prompt": "q", "responses": ["c", "a", "b", "d"], "ranks": [2, 0, 2, 1]}]))
    write_file([rec], tmp_path / "o.jsonl", "ranking")
    (line,) = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert line == {"prompt": [U("q")], "responses": ["c", "a", "b", "d"], "ranks": [2, 0, 2, 1]}


def test_to_messages_and_sft_paths():
    t1 = read_file(FIX / "oasst.trees.jsonl")[0]
    paths = [[m["content"] for m in p] for p in to_messages(t1)]
    assert paths == [["What is the capital of France?", "Paris.", "And of Italy?", "Rome."],
                     ["What is the capital of France?", "Lyon."]]
    # Lyon. is ranked below Paris.: SFT keeps only the best-ranked branch
    assert [[m["content"] for m in p] for p in sft_messages(t1)] == [paths[0]]
    hh = read_file(FIX / "hh_rlhf.jsonl")[1]
    assert [p[-1]["content"] for p in sft_messages(hh)] == ["About an hour, until doubled."]
    # paths ending in a user message are not SFT examples
    rec = ConversationRecord([Node("a", None, "user", "hi"), Node("b", "a", "assistant", "yo"), Node("c", "b", "user", "and?")])
    assert list(to_messages(rec)) == [[U("hi"), A("yo"), U("and?")]]
    assert list(sft_messages(rec)) == []


def test_messages_export_from_tree_keeps_best_leaf(tmp_path):
    recs = read_file(FIX / "preference.jsonl") + read_file(FIX / "ranking.jsonl")
    n = write_file(recs, tmp_path / "sft.jsonl", "messages")
    lines = [json.loads(x) for x in (tmp_path / "sft.jsonl").read_text(encoding="utf-8").splitlines()]
    assert n == len(lines) == 4  # one line per record: only the best-ranked leaf of each ranking
    last = [m["messages"][-1]["content"] for m in lines]
    assert last == ["Blue.", "Très bien, merci.", "2: its only divisors are 1 and 2.", "Hi there!"]
    assert lines[1]["id"] == "p2" and lines[2]["category"] == "math"  # record meta kept as extra keys
    assert lines[3]["messages"] == [{"role": "system", "content": "Be kind."}, U("Say hi."), A("Hi there!")]
    assert "Green." not in last and "7" not in last and "hi" not in last


def test_messages_export_tied_best_keeps_both(tmp_path):
    (rec,) = read_file(write_lines(tmp_path / "t.jsonl", [{"prompt": "q", "responses": ["a", "b", "c"], "ranks": [0, 0, 1]}]))
    write_file([rec], tmp_path / "o.jsonl", "messages")
    got = [json.loads(x)["messages"][-1]["content"] for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert got == ["a", "b"]


def test_write_is_atomic(tmp_path):
    out = tmp_path / "data.jsonl"
    out.write_text("OLD\n")
    good = read_file(FIX / "messages.jsonl")[0]
    broken = ConversationRecord([Node("x", "missing-parent", "user", "hi")])
    with pytest.raises(ValueError, match="record 1: .*unknown parent"):
        write_file(iter([good, broken]), out, "messages")
    assert out.read_text() == "OLD\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]  # no temp file left behind


def test_write_unwritable_format(tmp_path):
    with pytest.raises(FormatError, match="cannot write format 'hh-rlhf'"):
        write_file([], tmp_path / "x.jsonl", "hh-rlhf")
    assert set(WRITABLE_FORMATS) == {"messages", "preference", "ranking"}


# --------------------------------------------------------------------------- malformed input

GOOD_MSG = {"messages": [U("hi"), A("hello")]}
GOOD_RANK = {"prompt": [U("q")], "responses": ["a", "b"], "ranks": [0, 1]}

BAD_CASES = {
    "invalid_json": ("messages", [GOOD_MSG, '{"messages": [', GOOD_MSG], 2, None, "invalid JSON"),
    "not_object": ("messages", [GOOD_MSG, "[1, 2]"], 2, None, "expected a JSON object"),
    "missing_field": ("messages", [GOOD_MSG, GOOD_MSG, {"msgs": []}], 3, '"messages"', "missing"),
    "wrong_type": ("messages", [{"messages": "hi"}], 1, '"messages"', "expected a list of messages, got string"),
    "content_type": ("messages", [{"messages": [U("hi"), {"role": "assistant", "content": 5}]}], 1,
                     '"messages"[1].content', "expected a string, got integer"),
    "unknown_role": ("messages", [GOOD_MSG] * 6 + [{"messages": [U("a"), A("b"), {"role": "bot", "content": "x"}]}], 7,
                     '"messages"[2].role', 'expected one of system/user/assistant, got "bot"'),
    "empty_content": ("messages", [{"messages": [U("hi"), A("  ")]}], 1, '"messages"[1].content', "must not be empty"),
    "empty_messages": ("messages", [{"messages": []}], 1, '"messages"', "must not be an empty list"),
    "ranks_length": ("ranking", [GOOD_RANK, {"prompt": [U("q")], "responses": ["a", "b", "c"], "ranks": [0, 1]}], 2,
                     '"ranks"', 'has 2 entries but "responses" has 3'),
    "one_response": ("ranking", [{"prompt": [U("q")], "responses": ["a"], "ranks": [0]}], 1,
                     '"responses"', "expected at least 2 responses, got 1"),
    "bad_rank": ("ranking", [{"prompt": "q", "responses": ["a", "b"], "ranks": [0, -1]}], 1, '"ranks"[1]', "non-negative integer"),
    "empty_response": ("ranking", [{"prompt": "q", "responses": ["a", ""], "ranks": [0, 1]}], 1, '"responses"[1]', "must not be empty"),
    "missing_ranks": ("ranking", [{"prompt": "q", "responses": ["a", "b"]}], 1, '"ranks"', "missing"),
    "pref_missing_rejected": ("preference", [{"prompt": "q", "chosen": "a"}], 1, '"rejected"', "missing"),
    "pref_chosen_role": ("preference", [{"prompt": [U("q")], "chosen": [U("a")], "rejected": [A("b")]}], 1,
                         '"chosen"[0].role', 'expected "assistant"'),
    "pref_prompt_type": ("preference", [{"prompt": 3, "chosen": "a", "rejected": "b"}], 1, '"prompt"', "got integer"),
    "hh_empty_final": ("hh-rlhf", [{"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant:"}], 1,
                       '"rejected"', 'final "Assistant:" reply is empty'),
    "hh_no_markers": ("hh-rlhf", [{"chosen": "just text", "rejected": "\n\nHuman: hi\n\nAssistant: x"}], 1,
                      '"chosen"', 'start with "Human:"'),
    "hh_identical": ("hh-rlhf", [{"chosen": "\n\nHuman: hi\n\nAssistant: x", "rejected": "\n\nHuman: hi\n\nAssistant: x"}], 1,
                     '"chosen"/"rejected"', "identical"),
    "oasst_role": ("oasst", [{"message_tree_id": "t", "tree_state": "ready_for_export", "prompt": {
        "message_id": "t", "text": "q", "role": "prompter", "replies": [{"message_id": "a", "text": "x", "role": "bot"}]}}], 1,
        '"prompt".replies[0].role', 'expected one of prompter/assistant, got "bot"'),
    "oasst_flat_parent": ("oasst", [
        {"message_id": "t", "parent_id": None, "message_tree_id": "t", "role": "prompter", "text": "q"},
        {"message_id": "a", "parent_id": "nope", "message_tree_id": "t", "role": "assistant", "text": "x"}], 2,
        '"parent_id"', 'unknown parent message "nope"'),
    "oasst_flat_text": ("oasst", [
        {"message_id": "t", "parent_id": None, "message_tree_id": "t", "role": "prompter", "text": "q"},
        {"message_id": "a", "parent_id": "t", "message_tree_id": "t", "role": "assistant", "text": ""}], 2,
        '"text"', "must not be empty"),
    "uf_rejected_type": ("ultrafeedback", [{"prompt": "q", "prompt_id": "1", "chosen": [U("q"), A("a")], "rejected": "b",
                                            "score_chosen": 1, "score_rejected": 0}], 1, '"rejected"', "expected a list"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_malformed_input_names_file_line_field(tmp_path, case):
    fmt, lines, line, field, message = BAD_CASES[case]
    path = write_lines(tmp_path / f"bad_{case}.jsonl", lines)
    with pytest.raises(FormatError) as info:
        read_file(path, fmt)
    text = str(info.value)
    assert f"bad_{case}.jsonl line {line}: " in text
    if field is not None:
        assert f"field {field}: " in text
    assert message in text
    assert info.value.line == line and isinstance(info.value, ValueError)


def test_example_message_exactly(tmp_path):
    path = write_lines(tmp_path / "data.jsonl", BAD_CASES["unknown_role"][1])
    with pytest.raises(FormatError) as info:
        read_file(path)
    assert str(info.value) == f'{path} line 7: field "messages"[2].role: expected one of system/user/assistant, got "bot"'


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_no_records(tmp_path, content):
    p = tmp_path / "empty.jsonl"
    p.write_text(content)
    with pytest.raises(FormatError, match=r"empty\.jsonl: no records"):
        read_file(p, "messages")
    with pytest.raises(FormatError, match="no records"):
        detect_format(p)


def test_non_strict_skips_bad_lines(tmp_path):
    p = write_lines(tmp_path / "mixed.jsonl", [GOOD_MSG, "{oops", {"messages": [{"role": "bot", "content": "x"}]}, GOOD_MSG])
    with pytest.raises(FormatError, match="line 2"):
        read_file(p)
    recs = read_file(p, strict=False)
    assert len(recs) == 2
    assert len(recs.skipped) == 2 and "line 2" in recs.skipped[0] and "line 3" in recs.skipped[1]


# --------------------------------------------------------------------------- store import/export


class FakeStore:
    """Records how import_file/export_file call the store interface."""

    def __init__(self):
        self.calls = []
        self.records = []

    def import_records(self, records, *, user_id=None):
        records = list(records)
        self.calls.append((len(records), user_id))
        self.records.extend(records)
        return (len(records), sum(len(r.nodes) for r in records), sum(len(r.rankings) for r in records))

    def export_records(self, conversation_ids=None):
        ids = range(len(self.records)) if conversation_ids is None else conversation_ids
        return iter([self.records[i] for i in ids])


def _five_line_file(tmp_path, bad_line_5: bool) -> Path:
    lines = [GOOD_RANK, {"prompt": "p2", "responses": ["x", "y", "z"], "ranks": [1, 0, 1]}, GOOD_RANK, GOOD_RANK,
             {"prompt": "p5", "responses": ["only one"], "ranks": [0]} if bad_line_5 else GOOD_RANK, GOOD_RANK]
    return write_lines(tmp_path / "batch.jsonl", lines)


def test_import_file_single_call_and_nothing_on_error(tmp_path):
    store = FakeStore()
    with pytest.raises(FormatError, match="batch.jsonl line 5"):
        import_file(store, _five_line_file(tmp_path, bad_line_5=True))
    assert store.calls == []
    import_file(store, _five_line_file(tmp_path, bad_line_5=False), user_id=7)
    assert store.calls == [(6, 7)]
    export_file(store, tmp_path / "out.jsonl", "ranking", conversation_ids=[1])
    assert [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()] == [
        {"prompt": [U("p2")], "responses": ["x", "y", "z"], "ranks": [1, 0, 1]}]


def _real_store(tmp_path):
    store_mod = pytest.importorskip("loopchat.data.store")
    return store_mod.Store(f"sqlite:///{tmp_path / 't.db'}")


def test_store_import_all_or_nothing(tmp_path):
    store = _real_store(tmp_path)
    with pytest.raises(FormatError, match="batch.jsonl line 5"):
        import_file(store, _five_line_file(tmp_path, bad_line_5=True))
    assert list(store.export_records()) == []
    stats = import_file(store, _five_line_file(tmp_path, bad_line_5=False))
    assert (stats.conversations, stats.rankings) == (6, 6)


@pytest.mark.parametrize("name,fmt", [("messages.jsonl", "messages"), ("preference.jsonl", "preference"), ("ranking.jsonl", "ranking")])
def test_store_export_reproduces_import(tmp_path, name, fmt):
    store = _real_store(tmp_path)
    stats = import_file(store, FIX / name)
    recs = read_file(FIX / name)
    assert stats.conversations == len(recs)
    assert stats.messages == sum(len(r.nodes) for r in recs)
    n = export_file(store, tmp_path / "out.jsonl", fmt)
    assert n == len(recs)
    assert [json.loads(x) for x in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()] == [
        json.loads(x) for x in (FIX / name).read_text(encoding="utf-8").splitlines()]


def test_store_export_oasst_tree(tmp_path):
    store = _real_store(tmp_path)
    import_file(store, FIX / "oasst.trees.jsonl")
    exported = list(store.export_records())
    assert [canon(r)["paths"] for r in exported] == [canon(r)["paths"] for r in read_file(FIX / "oasst.trees.jsonl")]
    assert export_file(store, tmp_path / "r.jsonl", "ranking") == 1
    assert export_file(store, tmp_path / "p.jsonl", "preference") == 1
    assert export_file(store, tmp_path / "m.jsonl", "messages") == 2  # t1 best branch + t2
