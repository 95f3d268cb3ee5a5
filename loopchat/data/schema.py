"""SQLAlchemy tables for the conversation store (SQLite by default, PostgreSQL by URL).

The shapes follow DESIGN.md: a conversation is a tree of messages (each message points to
its parent, so regenerations and alternatives are siblings), a ranking orders sibling
messages best first with ties, feedback and filter reports attach to one message, and
model versions form a lineage of which exactly one is current.

Only portable types are used (Integer, String, Text, Boolean, JSON, timestamps) so the same
models and the same Alembic migrations work on both backends. This file is the source of
truth for the *models*; loopchat/migrations/versions/ is the source of truth for the
*database*; tests/test_store.py checks that the two agree.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

USER_ROLES = ("user", "trainer", "admin")
MESSAGE_ROLES = ("system", "user", "assistant")  # same as records.ROLES
FILTER_KINDS = ("false_positive", "false_negative")  # "flagged but fine" / "should have been flagged"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """A timestamp that always comes back as an aware UTC datetime.

    PostgreSQL stores `timestamptz`; SQLite has no time zones, so we store naive UTC there
    and re-attach UTC on the way out. Naive datetimes given to us are rejected rather than
    guessed at, because a wrong guess silently shifts data by hours.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"timestamps must be timezone-aware, got naive {value!r}")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


# Fixed constraint names, so later migrations can refer to them on both backends
# (SQLite batch mode needs named constraints to drop or alter them).
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class User(Base):
    __tablename__ = "users"
    __table_args__ = (CheckConstraint("role IN ('user', 'trainer', 'admin')", name="role"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    role: Mapped[str] = mapped_column(String(20), default="user")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ModelVersion(Base):
    """A checkpoint folder plus where it came from and how it scored."""

    __tablename__ = "model_versions"
    __table_args__ = (
        # At most one current version, enforced by the database itself with a partial unique
        # index (both SQLite and PostgreSQL have them). The store keeps it "exactly one".
        Index(
            "uq_model_versions_one_current",
            "is_current",
            unique=True,
            sqlite_where=text("is_current"),
            postgresql_where=text("is_current"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    path: Mapped[str] = mapped_column(Text)  # checkpoint folder
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    data_snapshot: Mapped[str | None] = mapped_column(Text)  # what data it was trained on
    eval_results: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    is_current: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Conversation(Base):
    """The container of one message tree. `source` says where it came from ("chat", "hh-rlhf", ...)."""

    __tablename__ = "conversations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), index=True)
    title: Mapped[str | None] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(100), default="chat")
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


class Message(Base):
    """One node of a conversation tree. Siblings (same parent) are alternative replies."""

    __tablename__ = "messages"
    __table_args__ = (CheckConstraint("role IN ('system', 'user', 'assistant')", name="role"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id"), index=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id"), index=True)
    role: Mapped[str] = mapped_column(String(20))
    content: Mapped[str] = mapped_column(Text)
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))  # who wrote it
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))  # who wrote it
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    # Object links let a bulk import build a whole tree and flush it at once: SQLAlchemy
    # inserts parents before children and fills in the ids.
    conversation: Mapped[Conversation] = relationship()
    parent: Mapped[Message | None] = relationship(remote_side=[id])


class Ranking(Base):
    """One person's ordering of sibling messages; the items live in ranking_items."""

    __tablename__ = "rankings"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    items: Mapped[list[RankingItem]] = relationship(order_by="RankingItem.position")


class RankingItem(Base):
    """One message in a ranking. `rank` is its group (0 = best; equal rank = tie);
    `position` keeps the order inside the ranking so groups come back exactly as given."""

    __tablename__ = "ranking_items"

    ranking_id: Mapped[int] = mapped_column(ForeignKey("rankings.id"), primary_key=True)
    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id"), primary_key=True, index=True)
    rank: Mapped[int] = mapped_column(Integer)
    position: Mapped[int] = mapped_column(Integer)

    message: Mapped[Message] = relationship()


class Feedback(Base):
    """Thumbs up (+1) / down (-1), a comment and a category, on one message."""

    __tablename__ = "feedback"
    __table_args__ = (CheckConstraint("thumbs IS NULL OR thumbs IN (1, -1)", name="thumbs"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id"), index=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    thumbs: Mapped[int | None] = mapped_column(Integer)
    comment: Mapped[str | None] = mapped_column(Text)
    category: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class FilterReport(Base):
    """A person saying the content filter was wrong about one message."""

    __tablename__ = "filter_reports"
    __table_args__ = (CheckConstraint("kind IN ('false_positive', 'false_negative')", name="kind"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id"), index=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    kind: Mapped[str] = mapped_column(String(20))
    comment: Mapped[str | None] = mapped_column(Text)
    categories: Mapped[list[str]] = mapped_column(JSON, default=list)  # moderation category names
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
