"""Tests for the conversation store, on SQLite and (when available) PostgreSQL.

PostgreSQL: `eval "$(bash .ci/postgres.sh | tail -1)"` sets LOOPCHAT_TEST_PG_URL; without it
the postgresql cases are skipped, unless LOOPCHAT_REQUIRE_PG=1 (CI), where they fail.
"""

from __future__ import annotations

import json
import os
import sqlite3
from datetime import timezone

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from loopchat.data.records import ConversationRecord, Node, RankingRecord
from loopchat.data.schema import Base
from loopchat.data.store import ImportStats, Store, alembic_config

# ----------------------------------------------------------------------------------------
# Fixtures (kept here, not in a conftest, so this file stands alone)


def _reset_postgres(url: str) -> None:
    """Drop every table (ours and alembic_version) so each test migrates from scratch."""
    engine = sa.create_engine(url)
    try:
        md = sa.MetaData()
        md.reflect(engine)
        md.drop_all(engine)
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    url = os.environ.get("LOOPCHAT_TEST_PG_URL")
    if not url:
        if os.environ.get("LOOPCHAT_REQUIRE_PG") == "1":
            pytest.fail("LOOPCHAT_REQUIRE_PG=1 but LOOPCHAT_TEST_PG_URL is not set (run .ci/postgres.sh)")
        pytest.skip("LOOPCHAT_TEST_PG_URL not set (run .ci/postgres.sh)")
    _reset_postgres(url)
    return url


@pytest.fixture
def store(store_url):
    s = Store(store_url)
    yield s
    s.close()


def row_counts(store: Store) -> dict[str, int]:
    with store.engine.connect() as c:
        return {t.name: c.scalar(sa.select(sa.func.count()).select_from(t)) for t in Base.metadata.sorted_tables}


def chat(store: Store):
    """user -> (assistant a, assistant b, assistant c): a prompt with three alternative replies."""
    u = store.user("alice")
    conv = store.new_conversation(u, title="hello")
    p = store.add_message(conv, None, "user", "What is 2+2?", user_id=u)
    a = store.add_message(conv, p, "assistant", "4")
    b = store.add_message(conv, p, "assistant", "four")
    c = store.add_message(conv, p, "assistant", "5")
    return u, conv, p, a, b, c


# ----------------------------------------------------------------------------------------
# Users, conversations, messages


def test_user_get_or_create(store):
    a = store.user("alice")
    assert store.user("alice") == a
    t = store.user("tess", role="trainer")
    assert t != a
    assert store.user("tess", role="admin") == t  # existing user: same id, role untouched
    with store.engine.connect() as c:
        assert c.execute(sa.text("SELECT role FROM users WHERE id = :i"), {"i": t}).scalar() == "trainer"
    with pytest.raises(ValueError, match="role"):
        store.user("bob", role="root")
    with pytest.raises(ValueError, match="name"):
        store.user("  ")
    assert row_counts(store)["users"] == 2


def test_message_tree_siblings_and_thread(store):
    u, conv, p, a, b, c = chat(store)
    v = store.add_model_version("sft-1", "/runs/sft-1")
    follow = store.add_message(conv, b, "user", "why?", user_id=u, meta={"lang": "en", "n": [1, 2]})
    answer = store.add_message(conv, follow, "assistant", "because", model_version_id=v)

    assert [m.id for m in store.children(p)] == [a, b, c]  # siblings, by id
    assert store.children(answer) == []
    assert [m.id for m in store.thread(answer)] == [p, b, follow, answer]
    assert [m.id for m in store.thread(p)] == [p]
    assert [m.id for m in store.conversation_messages(conv)] == [p, a, b, c, follow, answer]

    m = store.message(follow)
    assert (m.conversation_id, m.parent_id, m.role, m.content, m.user_id) == (conv, b, "user", "why?", u)
    assert m.meta == {"lang": "en", "n": [1, 2]}
    assert store.message(answer).model_version_id == v
    assert store.message(p).parent_id is None
    assert m.created_at.tzinfo is not None and m.created_at.utcoffset().total_seconds() == 0

    cv = store.conversation(conv)
    assert (cv.id, cv.user_id, cv.title, cv.source, cv.meta) == (conv, u, "hello", "chat", {})
    assert cv.created_at.tzinfo == timezone.utc


def test_add_message_validation_leaves_db_unchanged(store):
    u, conv, p, a, b, c = chat(store)
    other = store.new_conversation(u)
    before = row_counts(store)
    with pytest.raises(ValueError, match="role"):
        store.add_message(conv, p, "robot", "hi")
    with pytest.raises(ValueError, match=f"conversation {conv}"):
        store.add_message(other, p, "assistant", "wrong tree")
    with pytest.raises(ValueError, match="content"):
        store.add_message(conv, p, "assistant", 42)
    with pytest.raises(ValueError, match="meta"):
        store.add_message(conv, p, "assistant", "x", meta={"s": {1, 2}})  # not JSON
    with pytest.raises(ValueError, match="id must be an int"):
        store.add_message("1", p, "assistant", "x")
    with pytest.raises(LookupError, match="unknown model version id 77"):
        store.add_message(conv, p, "assistant", "x", model_version_id=77)
    assert row_counts(store) == before


def test_conversations_listing_and_title(store):
    a, b = store.user("alice"), store.user("bob")
    c1 = store.new_conversation(a, source="chat", meta={"k": 1})
    c2 = store.new_conversation(b)
    c3 = store.new_conversation(a, title="third")
    assert [c.id for c in store.conversations()] == [c3, c2, c1]  # newest first
    assert [c.id for c in store.conversations(user_id=a)] == [c3, c1]
    assert [c.id for c in store.conversations(limit=1, offset=1)] == [c2]
    assert store.conversations(user_id=a)[1].meta == {"k": 1}
    store.set_title(c1, "first")
    assert store.conversation(c1).title == "first"
    with pytest.raises(ValueError):
        store.conversations(limit=-1)
    with pytest.raises(ValueError, match="title"):
        store.set_title(c1, None)
    assert store.conversation(c1).title == "first"


# ----------------------------------------------------------------------------------------
# Rankings


def test_rankings_with_ties(store):
    u, conv, p, a, b, c = chat(store)
    r = store.add_ranking([[b, a], [c]], user_id=u, meta={"task": "rank"})
    (view,) = store.rankings()
    assert (view.id, view.groups, view.user_id, view.meta) == (r, [[b, a], [c]], u, {"task": "rank"})
    assert store.rankings(conv)[0].groups == [[b, a], [c]]

    # Another conversation's rankings are not mixed in.
    conv2 = store.new_conversation(u)
    q = store.add_message(conv2, None, "user", "hi")
    x, y = store.add_message(conv2, q, "assistant", "x"), store.add_message(conv2, q, "assistant", "y")
    r2 = store.add_ranking([[y], [x]])
    assert [rv.id for rv in store.rankings(conv)] == [r]
    assert [rv.id for rv in store.rankings(conv2)] == [r2]
    assert [rv.id for rv in store.rankings()] == [r, r2]


def test_ranking_validation(store):
    u, conv, p, a, b, c = chat(store)
    deeper = store.add_message(conv, store.add_message(conv, a, "user", "more"), "assistant", "deeper")
    before = row_counts(store)
    with pytest.raises(ValueError, match="sibling"):
        store.add_ranking([[a], [deeper]])
    with pytest.raises(LookupError, match="unknown message id 9999"):
        store.add_ranking([[a], [9999]])
    with pytest.raises(ValueError, match="at least two"):
        store.add_ranking([[a]])
    with pytest.raises(ValueError, match="twice"):
        store.add_ranking([[a], [a]])
    with pytest.raises(ValueError, match="assistant"):
        store.add_ranking([[p], [a]])
    with pytest.raises(ValueError, match="group 1 is empty"):
        store.add_ranking([[a], [], [b]])
    with pytest.raises(ValueError, match="list"):
        store.add_ranking([a, b])
    with pytest.raises(ValueError, match="int"):
        store.add_ranking([[str(a)], [b]])
    with pytest.raises(LookupError, match="unknown user id 555"):
        store.add_ranking([[a], [b]], user_id=555)
    assert row_counts(store) == before
    assert store.rankings() == []


# ----------------------------------------------------------------------------------------
# Feedback and filter reports


def test_feedback(store):
    u, conv, p, a, b, c = chat(store)
    f1 = store.add_feedback(a, user_id=u, thumbs=1)
    f2 = store.add_feedback(c, thumbs=-1, comment="wrong sum", category="factual")
    f3 = store.add_feedback(a, comment="nice and short")
    assert [f.id for f in store.feedback()] == [f1, f2, f3]
    assert [f.id for f in store.feedback(a)] == [f1, f3]
    (fv,) = store.feedback(c)
    assert (fv.message_id, fv.user_id, fv.thumbs, fv.comment, fv.category) == (c, None, -1, "wrong sum", "factual")
    assert store.feedback(b) == []

    before = row_counts(store)
    for bad in (0, 2, True, "1", 1.0):
        with pytest.raises(ValueError, match="thumbs"):
            store.add_feedback(a, thumbs=bad)
    with pytest.raises(ValueError, match="needs"):
        store.add_feedback(a)
    with pytest.raises(ValueError, match="comment"):
        store.add_feedback(a, thumbs=1, comment=["x"])
    with pytest.raises(LookupError, match="unknown message id 4242"):
        store.add_feedback(4242, thumbs=1)
    assert row_counts(store) == before


def test_filter_reports(store):
    u, conv, p, a, b, c = chat(store)
    r1 = store.add_filter_report(p, "false_positive", user_id=u, comment="harmless math")
    r2 = store.add_filter_report(c, "false_negative", categories=["violence", "harassment"])
    views = store.filter_reports()
    assert [v.id for v in views] == [r1, r2]
    assert (views[0].message_id, views[0].kind, views[0].user_id, views[0].comment, views[0].categories) == (
        p, "false_positive", u, "harmless math", [])
    assert (views[1].kind, views[1].categories, views[1].comment) == ("false_negative", ["violence", "harassment"], None)

    before = row_counts(store)
    with pytest.raises(ValueError, match="kind"):
        store.add_filter_report(a, "maybe")
    with pytest.raises(ValueError, match="categories"):
        store.add_filter_report(a, "false_negative", categories="violence")
    with pytest.raises(LookupError, match="unknown message id 31337"):
        store.add_filter_report(31337, "false_positive")
    assert row_counts(store) == before


# ----------------------------------------------------------------------------------------
# Model versions


def test_model_versions_exactly_one_current_and_restore(store):
    assert store.current_model() is None
    v1 = store.add_model_version("sft-1", "/runs/sft-1", data_snapshot="demos@2025-01-01",
                                 eval_results={"win_rate": 0.5, "by": {"math": [1, 2]}})
    assert store.current_model().id == v1  # the first version is served so there always is one
    v2 = store.add_model_version("ppo-1", "/runs/ppo-1", parent_id=v1, eval_results={"win_rate": 0.7})
    assert store.current_model().id == v1  # adding does not promote

    store.set_current_model(v2)
    cur = store.current_model()
    assert (cur.id, cur.name, cur.path, cur.parent_id, cur.eval_results, cur.is_current) == (
        v2, "ppo-1", "/runs/ppo-1", v1, {"win_rate": 0.7}, True)
    assert [v.is_current for v in store.model_versions()] == [False, True]

    store.set_current_model(v1)  # restore the older one
    assert [v.is_current for v in store.model_versions()] == [True, False]
    store.set_current_model(v1)  # idempotent
    assert [v.is_current for v in store.model_versions()] == [True, False]
    first = store.model_versions()[0]
    assert (first.data_snapshot, first.eval_results) == ("demos@2025-01-01", {"win_rate": 0.5, "by": {"math": [1, 2]}})

    with pytest.raises(LookupError, match="unknown model version id 99"):
        store.set_current_model(99)
    assert store.current_model().id == v1  # a failed promotion changes nothing
    with pytest.raises(LookupError, match="unknown model version id 98"):
        store.add_model_version("x", "/x", parent_id=98)
    with pytest.raises(ValueError, match="eval results"):
        store.add_model_version("x", "/x", eval_results=[1])
    assert len(store.model_versions()) == 2

    # The database itself refuses a second current version, whoever writes to it.
    with pytest.raises(sa.exc.IntegrityError):
        with store.engine.begin() as c:
            c.execute(sa.text("UPDATE model_versions SET is_current = :t WHERE id = :i"), {"t": True, "i": v2})


# ----------------------------------------------------------------------------------------
# Import / export


def pair_record(prompt: str, chosen: str, rejected: str, **meta) -> ConversationRecord:
    # Children listed before their parent on purpose: import must order them itself.
    return ConversationRecord(
        nodes=[
            Node("c", "p", "assistant", chosen, {"score": 9}),
            Node("r", "p", "assistant", rejected),
            Node("p", "s", "user", prompt),
            Node("s", None, "system", "be brief"),
        ],
        rankings=[RankingRecord([["c"], ["r"]], {"annotator": "x"})],
        source="hh-rlhf",
        meta=meta,
    )


def canonical(rec: ConversationRecord):
    """Structure of a record with local ids replaced by each node's path of (role, content)."""
    by_id = {n.id: n for n in rec.nodes}

    def key(i):
        path = []
        while i is not None:
            path.append((by_id[i].role, by_id[i].content))
            i = by_id[i].parent
        return tuple(reversed(path))

    nodes = sorted((key(n.id), json.dumps(n.meta, sort_keys=True)) for n in rec.nodes)
    rankings = [([sorted(key(i) for i in g) for g in r.groups], r.meta) for r in rec.rankings]
    return nodes, rankings, rec.source, rec.meta


def test_import_export_round_trip(store):
    u = store.user("importer", role="trainer")
    recs = [
        pair_record("2+2?", "4", "5", category="math"),
        ConversationRecord(nodes=[Node("1", None, "user", "hi"), Node("2", "1", "assistant", "hello")], source="messages"),
        ConversationRecord(  # a three-way ranking with a tie
            nodes=[Node("q", None, "user", "name a color"), *(Node(x, "q", "assistant", x) for x in "xyz")],
            rankings=[RankingRecord([["y", "x"], ["z"]])],
        ),
    ]
    stats = store.import_records(recs, user_id=u)
    assert stats == ImportStats(conversations=3, messages=4 + 2 + 4, rankings=2)

    out = list(store.export_records())
    assert [canonical(r) for r in out] == [canonical(r) for r in recs]
    for r in out:
        r.validate()
        assert all(n.id.isdigit() for n in r.nodes)

    # Parents got db ids before children, and the tree is wired as in the record.
    conv = store.conversations(user_id=u)[-1]  # oldest = first record
    assert conv.source == "hh-rlhf" and conv.meta == {"category": "math"}
    msgs = store.conversation_messages(conv.id)
    assert [m.role for m in msgs] == ["system", "user", "assistant", "assistant"]
    assert [m.content for m in store.thread(msgs[2].id)] == ["be brief", "2+2?", "4"]
    assert msgs[2].meta == {"score": 9}
    assert store.rankings(conv.id)[0].user_id == u

    # Export of chosen conversations, and exporting again after re-import is stable.
    ids = [cv.id for cv in reversed(store.conversations())]  # oldest first = record order
    (only,) = store.export_records([ids[1]])
    assert canonical(only) == canonical(recs[1])
    store.import_records(out)
    again = list(store.export_records())
    assert [canonical(r) for r in again] == [canonical(r) for r in recs] * 2


def test_import_is_all_or_nothing(store):
    good = pair_record("a", "b", "c")
    bad = ConversationRecord(nodes=[Node("1", None, "user", "hi"), Node("2", "nope", "assistant", "x")])
    with pytest.raises(ValueError, match=r"record 1: .*unknown parent 'nope'"):
        store.import_records([good, bad, good])
    assert all(n == 0 for n in row_counts(store).values())

    not_assistant = ConversationRecord(
        nodes=[Node("1", None, "user", "a"), Node("2", None, "user", "b")], rankings=[RankingRecord([["1"], ["2"]])])
    with pytest.raises(ValueError, match=r"record 2: .*assistant"):
        store.import_records([good, good, not_assistant])
    cycle = ConversationRecord(nodes=[Node("r", None, "user", "q"), Node("a", "b", "user", "x"), Node("b", "a", "user", "y")])
    with pytest.raises(ValueError, match=r"record 0: .*cycle"):
        store.import_records([cycle])
    with pytest.raises(ValueError, match=r"record 1: .*ConversationRecord"):
        store.import_records([good, {"nodes": []}])
    assert all(n == 0 for n in row_counts(store).values())


# ----------------------------------------------------------------------------------------
# Errors, durability, files, migrations


@pytest.mark.parametrize("call", [
    lambda s: s.message(42),
    lambda s: s.children(42),
    lambda s: s.thread(42),
    lambda s: s.feedback(42),
    lambda s: s.add_message(1, 42, "user", "x"),
    lambda s: s.conversation(42),
    lambda s: s.conversation_messages(42),
    lambda s: s.rankings(42),
    lambda s: s.set_title(42, "t"),
    lambda s: s.new_conversation(user_id=42),
    lambda s: s.conversations(user_id=42),
    lambda s: list(s.export_records([1, 42])),
    lambda s: s.import_records([], user_id=42),
    lambda s: s.message(2**40),  # bigger than the id column: still "unknown", not a driver error
])
def test_unknown_ids_raise_lookup_error(store, call):
    store.add_message(store.new_conversation(), None, "user", "only message")  # ids 1 exist
    before = row_counts(store)
    with pytest.raises(LookupError, match=r"unknown \w+( \w+)? id (42|1099511627776)\b"):
        call(store)
    assert row_counts(store) == before


def test_writes_are_committed_before_return(store):
    u, conv, p, a, b, c = chat(store)
    store.add_feedback(a, thumbs=1)
    other = Store(store.url)  # a separate engine and connection, like another process
    try:
        assert [m.id for m in other.children(p)] == [a, b, c]
        assert other.feedback(a)[0].thumbs == 1
    finally:
        other.close()


def test_reopen_keeps_data_and_migration_is_idempotent(store):
    u, conv, p, a, b, c = chat(store)
    url = store.url
    store.close()
    for _ in range(2):
        s = Store(url)
        assert [m.content for m in s.conversation_messages(conv)] == ["What is 2+2?", "4", "four", "5"]
        assert s.user("alice") == u
        with s.engine.connect() as conn:
            assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all() == ["0001"]
        s.close()


def test_migrations_match_models(store):
    """The hand-written migration and schema.py describe the same tables."""
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == []


def test_downgrade_and_upgrade_again(store):
    with store._write_engine.begin() as conn:
        command.downgrade(alembic_config(conn), "base")
    with store.engine.connect() as conn:
        assert set(sa.inspect(conn).get_table_names()) <= {"alembic_version"}
    with store._write_engine.begin() as conn:
        command.upgrade(alembic_config(conn), "head")
    assert chat(store)[1] == 1


def test_sqlite_default_file_wal_and_foreign_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("LOOPCHAT_HOME", str(tmp_path / "home"))
    s = Store()
    try:
        path = tmp_path / "home" / "data" / "loopchat.db"
        assert s.url == f"sqlite:///{path}"
        assert path.is_file()
        with s.engine.connect() as c:
            assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        s.add_message(s.new_conversation(), None, "user", "hi")
    finally:
        s.close()
    # WAL is a property of the file: a plain sqlite3 connection sees it too, and the data.
    raw = sqlite3.connect(path)
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("SELECT content FROM messages").fetchall() == [("hi",)]
    finally:
        raw.close()
    # Foreign keys are really enforced on the store's connections (SQLite's default is off).
    s = Store()
    try:
        with pytest.raises(sa.exc.IntegrityError):
            with s.engine.begin() as c:
                c.exec_driver_sql("INSERT INTO messages (conversation_id, role, content, meta, created_at) "
                                  "VALUES (999, 'user', 'x', '{}', '2025-01-01 00:00:00')")
    finally:
        s.close()
