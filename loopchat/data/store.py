"""The conversation store: everything people give (chats, thumbs, comments, rankings,
filter reports) and the model versions trained on it, in one SQL database.

    store = Store()                      # SQLite file under $LOOPCHAT_HOME/data
    store = Store("postgresql+psycopg://user:pw@host/db")

Rules every method follows:
- Writes are committed before the method returns (what a person gives is never lost).
- Bad input raises before anything is written: ValueError naming what is wrong, or
  LookupError for an id that does not exist ("unknown message id 42"). Each write runs in
  one transaction, so a failure half-way leaves the database as it was.
- Nothing here deletes data; training only reads (export_records) and adds model versions.
- Results are frozen *View dataclasses, never live ORM objects, so callers cannot change
  the database by accident and nothing depends on a session staying open.

Opening a Store migrates the database to the newest schema (Alembic `upgrade head`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy import event, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from loopchat import paths
from loopchat.data.records import ConversationRecord, Node, RankingRecord
from loopchat.data.schema import (
    FILTER_KINDS,
    MESSAGE_ROLES,
    USER_ROLES,
    Conversation,
    Feedback,
    FilterReport,
    Message,
    ModelVersion,
    Ranking,
    RankingItem,
    User,
)

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


# ----------------------------------------------------------------------------------------
# What callers get back


@dataclass(frozen=True)
class MessageView:
    id: int
    conversation_id: int
    parent_id: int | None
    role: str
    content: str
    created_at: datetime
    meta: dict
    model_version_id: int | None
    user_id: int | None


@dataclass(frozen=True)
class ConversationView:
    id: int
    user_id: int | None
    title: str | None
    source: str
    created_at: datetime
    meta: dict


@dataclass(frozen=True)
class RankingView:
    id: int
    groups: list[list[int]]  # message ids, best group first; ids in one group are tied
    user_id: int | None
    created_at: datetime
    meta: dict


@dataclass(frozen=True)
class FeedbackView:
    id: int
    message_id: int
    user_id: int | None
    thumbs: int | None
    comment: str | None
    category: str | None
    created_at: datetime


@dataclass(frozen=True)
class FilterReportView:
    id: int
    message_id: int
    user_id: int | None
    kind: str
    comment: str | None
    categories: list[str]
    created_at: datetime


@dataclass(frozen=True)
class ModelVersionView:
    id: int
    name: str
    path: str
    parent_id: int | None
    data_snapshot: str | None
    eval_results: dict
    is_current: bool
    created_at: datetime


@dataclass(frozen=True)
class ImportStats:
    conversations: int
    messages: int
    rankings: int


def _message_view(m: Message) -> MessageView:
    return MessageView(m.id, m.conversation_id, m.parent_id, m.role, m.content, m.created_at,
                       dict(m.meta or {}), m.model_version_id, m.user_id)


def _conversation_view(c: Conversation) -> ConversationView:
    return ConversationView(c.id, c.user_id, c.title, c.source, c.created_at, dict(c.meta or {}))


def _ranking_view(r: Ranking) -> RankingView:
    groups: list[list[int]] = []
    for item in r.items:  # ordered by position, so groups come back in the given order
        if item.rank == len(groups):
            groups.append([])
        groups[item.rank].append(item.message_id)
    return RankingView(r.id, groups, r.user_id, r.created_at, dict(r.meta or {}))


def _feedback_view(f: Feedback) -> FeedbackView:
    return FeedbackView(f.id, f.message_id, f.user_id, f.thumbs, f.comment, f.category, f.created_at)


def _report_view(r: FilterReport) -> FilterReportView:
    return FilterReportView(r.id, r.message_id, r.user_id, r.kind, r.comment, list(r.categories or []), r.created_at)


def _model_view(v: ModelVersion) -> ModelVersionView:
    return ModelVersionView(v.id, v.name, v.path, v.parent_id, v.data_snapshot, dict(v.eval_results or {}),
                            bool(v.is_current), v.created_at)


# ----------------------------------------------------------------------------------------
# Input checks. They run before any write, so bad input never reaches the database and
# the error says what was wrong in words, not as a driver exception.


def _check_id(value: Any, what: str) -> int:
    # bool is a subclass of int; True as an id is always a mistake.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{what} id must be an int, got {type(value).__name__} {value!r}")
    return value


def _check_str(value: Any, what: str, *, optional: bool = False, nonempty: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    if nonempty and not value.strip():
        raise ValueError(f"{what} must not be empty")
    return value


def _check_choice(value: Any, what: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{what} must be one of {choices}, got {value!r}")
    return value


def _check_json_dict(value: Any, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a dict, got {type(value).__name__}")
    try:
        # Round-trip through JSON: catches values the column cannot hold (sets, objects)
        # and stores a plain copy, so later changes to the caller's dict do not leak in.
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be JSON-serialisable: {e}") from None


def _check_groups(groups: Any) -> list[list[int]]:
    """Shape checks for a ranking: a list of non-empty lists of distinct message ids."""
    if not isinstance(groups, (list, tuple)):
        raise ValueError(f"ranking groups must be a list of lists of message ids, got {type(groups).__name__}")
    out: list[list[int]] = []
    for i, g in enumerate(groups):
        if not isinstance(g, (list, tuple)):
            raise ValueError(f"ranking group {i} must be a list of message ids, got {type(g).__name__}")
        if not g:
            raise ValueError(f"ranking group {i} is empty")
        out.append([_check_id(m, "message") for m in g])
    flat = [m for g in out for m in g]
    if len(set(flat)) != len(flat):
        raise ValueError(f"a ranking lists the same message twice: {flat}")
    if len(flat) < 2:
        raise ValueError("a ranking needs at least two messages")
    return out


def _get(s: Session, cls: type, id_: Any, what: str):
    # Ids are 32-bit integers in both backends; asking PostgreSQL about a bigger one is a
    # driver error, not "not found", so answer that here.
    obj = s.get(cls, id_) if 0 < _check_id(id_, what) < 2**31 else None
    if obj is None:
        raise LookupError(f"unknown {what} id {id_}")
    return obj


def _get_optional(s: Session, cls: type, id_: Any, what: str):
    return None if id_ is None else _get(s, cls, id_, what)


# ----------------------------------------------------------------------------------------
# Engine and migrations


def make_engine(url: str) -> sa.Engine:
    """An engine with the settings loopchat relies on.

    SQLite: foreign keys ON (off by default!) and WAL journal mode (readers do not block
    the writer, so the web app can serve while a trainer exports). We also take over
    BEGIN from Python's sqlite3 module, which otherwise skips it before DDL and SAVEPOINT;
    write transactions use BEGIN IMMEDIATE so two writers queue on the lock instead of one
    failing with "database is locked" half-way through a read-then-write.
    """
    u = sa.make_url(url)
    if u.get_backend_name() != "sqlite":
        return sa.create_engine(url, pool_pre_ping=True)

    if u.database and u.database != ":memory:" and not u.database.startswith("file:"):
        Path(u.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, connect_args={"timeout": 30})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves, see below
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("loopchat_write") else "BEGIN")

    return engine


def alembic_config(connection: sa.Connection | None = None, url: str | None = None) -> Config:
    """Alembic config pointing at the packaged migrations; no alembic.ini needed.

    To draft a new migration (then edit it by hand):
        from alembic import command
        from loopchat.data.store import Store, alembic_config
        Store("sqlite:///scratch.db").close()      # scratch db at head
        command.revision(alembic_config(url="sqlite:///scratch.db"), "add foo", autogenerate=True)
    """
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url)
    cfg.attributes["connection"] = connection
    return cfg


# ----------------------------------------------------------------------------------------
# The store


class Store:
    def __init__(self, url: str | None = None):
        self.url = url if url is not None else paths.default_db_url()
        self.engine = make_engine(self.url)
        # Same pool, but transactions begin as writes (BEGIN IMMEDIATE on SQLite).
        self._write_engine = self.engine.execution_options(loopchat_write=True)
        with self._write_engine.begin() as conn:
            command.upgrade(alembic_config(conn), "head")

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self.engine.url!r})"  # engine.url hides the password

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with Session(self.engine) as s:
            yield s

    @contextmanager
    def _write(self) -> Iterator[Session]:
        """One transaction: committed when the block ends, rolled back if it raises."""
        with Session(self._write_engine) as s, s.begin():
            yield s

    # -- users -------------------------------------------------------------------------

    def user(self, name: str, role: str = "user") -> int:
        """Id of the user with this name, created with `role` if new. An existing user's
        role is left as it is: changing who is an admin should not happen by accident."""
        _check_str(name, "user name", nonempty=True)
        _check_choice(role, "user role", USER_ROLES)
        for _ in range(2):  # second try only if another process created the same name meanwhile
            try:
                with self._write() as s:
                    existing = s.scalar(select(User.id).where(User.name == name))
                    if existing is not None:
                        return existing
                    u = User(name=name, role=role)
                    s.add(u)
                    s.flush()
                    return u.id
            except IntegrityError:
                continue
        raise RuntimeError(f"could not create user {name!r}")

    # -- conversations and messages ----------------------------------------------------

    def new_conversation(self, user_id: int | None = None, title: str | None = None, source: str = "chat",
                         meta: dict | None = None) -> int:
        _check_str(title, "title", optional=True)
        _check_str(source, "source", nonempty=True)
        meta = _check_json_dict(meta, "conversation meta")
        with self._write() as s:
            _get_optional(s, User, user_id, "user")
            c = Conversation(user_id=user_id, title=title, source=source, meta=meta)
            s.add(c)
            s.flush()
            return c.id

    def add_message(self, conversation_id: int, parent_id: int | None, role: str, content: str, *,
                    model_version_id: int | None = None, user_id: int | None = None,
                    meta: dict | None = None) -> int:
        """Add a node to a conversation tree. A second child of the same parent is an
        alternative reply (a sibling), which is how regenerations are stored."""
        _check_choice(role, "message role", MESSAGE_ROLES)
        _check_str(content, "message content")
        meta = _check_json_dict(meta, "message meta")
        with self._write() as s:
            _get(s, Conversation, conversation_id, "conversation")
            parent = _get_optional(s, Message, parent_id, "message")
            if parent is not None and parent.conversation_id != conversation_id:
                raise ValueError(f"parent message {parent_id} belongs to conversation {parent.conversation_id}, "
                                 f"not {conversation_id}")
            _get_optional(s, ModelVersion, model_version_id, "model version")
            _get_optional(s, User, user_id, "user")
            m = Message(conversation_id=conversation_id, parent_id=parent_id, role=role, content=content,
                        model_version_id=model_version_id, user_id=user_id, meta=meta)
            s.add(m)
            s.flush()
            return m.id

    def message(self, message_id: int) -> MessageView:
        with self._read() as s:
            return _message_view(_get(s, Message, message_id, "message"))

    def children(self, message_id: int) -> list[MessageView]:
        """Replies to a message; more than one means alternatives (siblings). Ordered by id."""
        with self._read() as s:
            _get(s, Message, message_id, "message")
            rows = s.scalars(select(Message).where(Message.parent_id == message_id).order_by(Message.id))
            return [_message_view(m) for m in rows]

    def thread(self, message_id: int) -> list[MessageView]:
        """The path root -> message: the context a model saw when it wrote this message."""
        with self._read() as s:
            m = _get(s, Message, message_id, "message")
            # One query for the whole tree, then walk up in Python (trees are small).
            by_id = {x.id: x for x in s.scalars(select(Message).where(Message.conversation_id == m.conversation_id))}
            path = [m]
            while path[-1].parent_id is not None:
                path.append(by_id[path[-1].parent_id])
            return [_message_view(x) for x in reversed(path)]

    def conversation(self, conversation_id: int) -> ConversationView:
        with self._read() as s:
            return _conversation_view(_get(s, Conversation, conversation_id, "conversation"))

    def conversation_messages(self, conversation_id: int) -> list[MessageView]:
        """Every node of the tree, ordered by id (so a parent always comes before its children)."""
        with self._read() as s:
            _get(s, Conversation, conversation_id, "conversation")
            rows = s.scalars(select(Message).where(Message.conversation_id == conversation_id).order_by(Message.id))
            return [_message_view(m) for m in rows]

    def conversations(self, user_id: int | None = None, limit: int = 100, offset: int = 0) -> list[ConversationView]:
        """Newest first; only one user's when user_id is given."""
        for v, what in ((limit, "limit"), (offset, "offset")):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{what} must be a non-negative int, got {v!r}")
        q = select(Conversation).order_by(Conversation.created_at.desc(), Conversation.id.desc())
        with self._read() as s:
            if user_id is not None:
                _get(s, User, user_id, "user")
                q = q.where(Conversation.user_id == user_id)
            return [_conversation_view(c) for c in s.scalars(q.limit(limit).offset(offset))]

    def set_title(self, conversation_id: int, title: str) -> None:
        _check_str(title, "title")
        with self._write() as s:
            _get(s, Conversation, conversation_id, "conversation").title = title

    # -- rankings ----------------------------------------------------------------------

    @staticmethod
    def _check_rankable(messages: list[Message]) -> None:
        """A ranking compares alternative replies to one context: siblings, all assistant."""
        for m in messages:
            if m.role != "assistant":
                raise ValueError(f"a ranking orders assistant messages; message {m.id} has role {m.role!r}")
        if len({(m.conversation_id, m.parent_id) for m in messages}) != 1:
            parents = ", ".join(f"{m.id}->{m.parent_id}" for m in messages)
            raise ValueError(f"a ranking must order sibling messages (same parent); message->parent: {parents}")

    def add_ranking(self, groups: list[list[int]], *, user_id: int | None = None, meta: dict | None = None) -> int:
        """Record an ordering of sibling assistant messages: groups best first, ties inside
        a group. E.g. [[5], [7, 8], [6]]: 5 is best, 7 and 8 tie, 6 is worst."""
        groups = _check_groups(groups)
        meta = _check_json_dict(meta, "ranking meta")
        with self._write() as s:
            _get_optional(s, User, user_id, "user")
            self._check_rankable([_get(s, Message, m, "message") for g in groups for m in g])
            r = Ranking(user_id=user_id, meta=meta)
            s.add(r)
            s.flush()
            position = 0
            for rank, g in enumerate(groups):
                for m in g:
                    s.add(RankingItem(ranking_id=r.id, message_id=m, rank=rank, position=position))
                    position += 1
            return r.id

    def rankings(self, conversation_id: int | None = None) -> list[RankingView]:
        """All rankings, or those of one conversation, ordered by id."""
        q = select(Ranking).options(selectinload(Ranking.items)).order_by(Ranking.id)
        with self._read() as s:
            if conversation_id is not None:
                _get(s, Conversation, conversation_id, "conversation")
                in_conv = (select(RankingItem.ranking_id).join(Message, Message.id == RankingItem.message_id)
                           .where(Message.conversation_id == conversation_id))
                q = q.where(Ranking.id.in_(in_conv))
            return [_ranking_view(r) for r in s.scalars(q)]

    # -- feedback and filter reports ---------------------------------------------------

    def add_feedback(self, message_id: int, *, user_id: int | None = None, thumbs: int | None = None,
                     comment: str | None = None, category: str | None = None) -> int:
        """Thumbs up (1) / down (-1), a comment and/or a category on one message."""
        if thumbs is not None and (not isinstance(thumbs, int) or isinstance(thumbs, bool) or thumbs not in (1, -1)):
            raise ValueError(f"thumbs must be 1, -1 or None, got {thumbs!r}")
        _check_str(comment, "feedback comment", optional=True)
        _check_str(category, "feedback category", optional=True)
        if thumbs is None and not comment and not category:
            raise ValueError("feedback needs thumbs, a comment or a category")
        with self._write() as s:
            _get(s, Message, message_id, "message")
            _get_optional(s, User, user_id, "user")
            f = Feedback(message_id=message_id, user_id=user_id, thumbs=thumbs, comment=comment, category=category)
            s.add(f)
            s.flush()
            return f.id

    def feedback(self, message_id: int | None = None) -> list[FeedbackView]:
        """All feedback, or that on one message, ordered by id."""
        q = select(Feedback).order_by(Feedback.id)
        with self._read() as s:
            if message_id is not None:
                _get(s, Message, message_id, "message")
                q = q.where(Feedback.message_id == message_id)
            return [_feedback_view(f) for f in s.scalars(q)]

    def add_filter_report(self, message_id: int, kind: str, *, user_id: int | None = None,
                          comment: str | None = None, categories: list[str] | None = None) -> int:
        """The content filter was wrong: "false_positive" (flagged but fine) or
        "false_negative" (should have been flagged), optionally naming categories."""
        _check_choice(kind, "filter report kind", FILTER_KINDS)
        _check_str(comment, "filter report comment", optional=True)
        categories = [] if categories is None else categories
        if not isinstance(categories, (list, tuple)) or not all(isinstance(c, str) for c in categories):
            raise ValueError(f"filter report categories must be a list of strings, got {categories!r}")
        with self._write() as s:
            _get(s, Message, message_id, "message")
            _get_optional(s, User, user_id, "user")
            r = FilterReport(message_id=message_id, user_id=user_id, kind=kind, comment=comment,
                             categories=list(categories))
            s.add(r)
            s.flush()
            return r.id

    def filter_reports(self) -> list[FilterReportView]:
        with self._read() as s:
            return [_report_view(r) for r in s.scalars(select(FilterReport).order_by(FilterReport.id))]

    # -- model versions ----------------------------------------------------------------

    def add_model_version(self, name: str, path: str, *, parent_id: int | None = None,
                          data_snapshot: str | None = None, eval_results: dict | None = None) -> int:
        """Register a checkpoint folder. It is not served until set_current_model() promotes
        it, except the very first version, which becomes current so that there always is one."""
        _check_str(name, "model version name", nonempty=True)
        if isinstance(path, os.PathLike):
            path = os.fspath(path)
        _check_str(path, "model version path", nonempty=True)
        _check_str(data_snapshot, "data snapshot", optional=True)
        eval_results = _check_json_dict(eval_results, "eval results")
        with self._write() as s:
            _get_optional(s, ModelVersion, parent_id, "model version")
            none_current = s.scalar(select(func.count()).where(ModelVersion.is_current)) == 0
            v = ModelVersion(name=name, path=str(path), parent_id=parent_id, data_snapshot=data_snapshot,
                             eval_results=eval_results, is_current=none_current)
            s.add(v)
            s.flush()
            return v.id

    def set_current_model(self, version_id: int) -> None:
        """Serve this version from now on (promote a new one, or restore an older one)."""
        with self._write() as s:
            v = _get(s, ModelVersion, version_id, "model version")
            # Clear first, then set, in one transaction: the unique index allows at most one
            # current row at every statement, and nobody ever sees zero or two.
            s.execute(update(ModelVersion).where(ModelVersion.is_current).values(is_current=False))
            v.is_current = True  # flushed at commit, after the UPDATE above

    def current_model(self) -> ModelVersionView | None:
        with self._read() as s:
            v = s.scalar(select(ModelVersion).where(ModelVersion.is_current))
            return None if v is None else _model_view(v)

    def model_versions(self) -> list[ModelVersionView]:
        """All versions, oldest first; follow parent_id for the lineage."""
        with self._read() as s:
            return [_model_view(v) for v in s.scalars(select(ModelVersion).order_by(ModelVersion.id))]

    # -- bulk import / export (the bridge to file formats and training) ----------------

    def import_records(self, records: Iterable[ConversationRecord], *, user_id: int | None = None) -> ImportStats:
        """Write many conversation trees in ONE transaction: all of them, or none.

        If record i is bad, raises ValueError("record i: why") and writes nothing. `user_id`
        (who imported them) is stored on the conversations and rankings. Local node ids map
        to new database ids; parents are inserted before children whatever the node order.
        """
        n_conv = n_msg = n_rank = 0
        with self._write() as s:
            _get_optional(s, User, user_id, "user")
            for i, rec in enumerate(records):
                try:
                    n_msg_i, n_rank_i = self._add_record(s, rec, user_id)
                except (ValueError, TypeError, LookupError) as e:
                    raise ValueError(f"record {i}: {e}") from e
                n_conv += 1
                n_msg += n_msg_i
                n_rank += n_rank_i
                if n_conv % 1000 == 0:
                    s.flush()  # bound memory on big imports; still one transaction
            # Any error above propagates out of _write(), which rolls everything back.
        return ImportStats(n_conv, n_msg, n_rank)

    def _add_record(self, s: Session, rec: ConversationRecord, user_id: int | None) -> tuple[int, int]:
        if not isinstance(rec, ConversationRecord):
            raise ValueError(f"expected a ConversationRecord, got {type(rec).__name__}")
        rec.validate()
        _check_str(rec.source, "source", nonempty=True)
        conv = Conversation(user_id=user_id, source=rec.source, meta=_check_json_dict(rec.meta, "record meta"))
        s.add(conv)

        # Parents before children: repeatedly place the nodes whose parent is placed.
        # validate() guarantees parents exist, so anything left over is a cycle.
        by_local: dict[str, Message] = {}
        pending = list(rec.nodes)
        while pending:
            ready = [n for n in pending if n.parent is None or n.parent in by_local]
            if not ready:
                raise ValueError(f"nodes form a cycle: {sorted(str(n.id) for n in pending)}")
            for n in ready:
                m = Message(conversation=conv, parent=by_local.get(n.parent) if n.parent is not None else None,
                            role=n.role, content=n.content, meta=_check_json_dict(n.meta, f"node {n.id!r} meta"))
                by_local[n.id] = m
                s.add(m)
            ready_ids = {id(n) for n in ready}
            pending = [n for n in pending if id(n) not in ready_ids]

        for r in rec.rankings:
            if not isinstance(r, RankingRecord):
                raise ValueError(f"expected a RankingRecord, got {type(r).__name__}")
            # validate() checked ids and siblings; the store also wants assistant replies only.
            for n in (n for g in r.groups for n in g):
                if by_local[n].role != "assistant":
                    raise ValueError(f"a ranking orders assistant messages; node {n!r} has role {by_local[n].role!r}")
            ranking = Ranking(user_id=user_id, meta=_check_json_dict(r.meta, "ranking meta"))
            position = 0
            for rank, g in enumerate(r.groups):
                for n in g:
                    ranking.items.append(RankingItem(message=by_local[n], rank=rank, position=position))
                    position += 1
            s.add(ranking)
        return len(rec.nodes), len(rec.rankings)

    def export_records(self, conversation_ids: list[int] | None = None) -> Iterator[ConversationRecord]:
        """Conversation trees as neutral records (node ids are str(db id)), for the file
        writers and for training. Rankings of a conversation's messages come with it."""
        with self._read() as s:
            if conversation_ids is None:
                ids = list(s.scalars(select(Conversation.id).order_by(Conversation.id)))
            else:
                ids = [_check_id(c, "conversation") for c in conversation_ids]
                found = set(s.scalars(select(Conversation.id).where(Conversation.id.in_(ids))))
                for c in ids:
                    if c not in found:
                        raise LookupError(f"unknown conversation id {c}")
        # Read in chunks with a fresh session each, so a long export never holds one
        # transaction (or all rows) open while the caller works on the records.
        for start in range(0, len(ids), 200):
            with self._read() as s:
                yield from self._export_chunk(s, ids[start:start + 200])

    def _export_chunk(self, s: Session, ids: list[int]) -> list[ConversationRecord]:
        convs = {c.id: c for c in s.scalars(select(Conversation).where(Conversation.id.in_(ids)))}
        nodes: dict[int, list[Node]] = {c: [] for c in ids}
        conv_of: dict[int, int] = {}
        for m in s.scalars(select(Message).where(Message.conversation_id.in_(ids)).order_by(Message.id)):
            conv_of[m.id] = m.conversation_id
            nodes[m.conversation_id].append(Node(
                id=str(m.id), parent=None if m.parent_id is None else str(m.parent_id),
                role=m.role, content=m.content, meta=dict(m.meta or {})))
        rankings: dict[int, list[RankingRecord]] = {c: [] for c in ids}
        q = (select(Ranking).where(Ranking.id.in_(
            select(RankingItem.ranking_id).join(Message, Message.id == RankingItem.message_id)
            .where(Message.conversation_id.in_(ids))))
             .options(selectinload(Ranking.items)).order_by(Ranking.id))
        for r in s.scalars(q):
            view = _ranking_view(r)
            conv = conv_of[view.groups[0][0]]  # all members are siblings, so one conversation
            rankings[conv].append(RankingRecord(groups=[[str(m) for m in g] for g in view.groups],
                                                meta=dict(r.meta or {})))
        return [ConversationRecord(nodes=nodes[c], rankings=rankings[c], source=convs[c].source,
                                   meta=dict(convs[c].meta or {})) for c in ids]
