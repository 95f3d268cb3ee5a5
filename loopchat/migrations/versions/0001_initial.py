"""Initial schema: users, model versions, conversations, messages, rankings, feedback, filter reports.

Written by hand to mirror loopchat/data/schema.py (tests/test_store.py checks they agree).
Constraint names are explicit so later migrations can alter them on SQLite and PostgreSQL.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def timestamp() -> sa.Column:
    return sa.Column("created_at", sa.DateTime(timezone=True), nullable=False)


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Integer, nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("role", sa.String(20), nullable=False),
        timestamp(),
        sa.PrimaryKeyConstraint("id", name="pk_users"),
        sa.UniqueConstraint("name", name="uq_users_name"),
        sa.CheckConstraint("role IN ('user', 'trainer', 'admin')", name="ck_users_role"),
    )

    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer, nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("parent_id", sa.Integer, nullable=True),
        sa.Column("data_snapshot", sa.Text, nullable=True),
        sa.Column("eval_results", sa.JSON, nullable=False),
        sa.Column("is_current", sa.Boolean, nullable=False),
        timestamp(),
        sa.PrimaryKeyConstraint("id", name="pk_model_versions"),
        sa.ForeignKeyConstraint(["parent_id"], ["model_versions.id"], name="fk_model_versions_parent_id_model_versions"),
    )
    # At most one current model version (partial unique index, both backends).
    op.create_index(
        "uq_model_versions_one_current",
        "model_versions",
        ["is_current"],
        unique=True,
        sqlite_where=sa.text("is_current"),
        postgresql_where=sa.text("is_current"),
    )

    op.create_table(
        "conversations",
        sa.Column("id", sa.Integer, nullable=False),
        sa.Column("user_id", sa.Integer, nullable=True),
        sa.Column("title", sa.Text, nullable=True),
        sa.Column("source", sa.String(100), nullable=False),
        sa.Column("meta", sa.JSON, nullable=False),
        timestamp(),
        sa.PrimaryKeyConstraint("id", name="pk_conversations"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_conversations_user_id_users"),
    )
    op.create_index("ix_conversations_user_id", "conversations", ["user_id"])
    op.create_index("ix_conversations_created_at", "conversations", ["created_at"])

    op.create_table(
        "messages",
        sa.Column("id", sa.Integer, nullable=False),
        sa.Column("conversation_id", sa.Integer, nullable=False),
        sa.Column("parent_id", sa.Integer, nullable=True),
        sa.Column("role", sa.String(20), nullable=False),
        sa.Column("content", sa.Text, nullable=False),
        sa.Column("meta", sa.JSON, nullable=False),
        sa.Column("model_version_id", sa.Integer, nullable=True),
        sa.Column("user_id", sa.Integer, nullable=True),
        timestamp(),
        sa.PrimaryKeyConstraint("id", name="pk_messages"),
        sa.CheckConstraint("role IN ('system', 'user', 'assistant')", name="ck_messages_role"),
        sa.ForeignKeyConstraint(["conversation_id"], ["conversations.id"], name="fk_messages_conversation_id_conversations"),
        sa.ForeignKeyConstraint(["parent_id"], ["messages.id"], name="fk_messages_parent_id_messages"),
        sa.ForeignKeyConstraint(["model_version_id"], ["model_versions.id"], name="fk_messages_model_version_id_model_versions"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_messages_user_id_users"),
    )
    op.create_index("ix_messages_conversation_id", "messages", ["conversation_id"])
    op.create_index("ix_messages_parent_id", "messages", ["parent_id"])

    op.create_table(
        "rankings",
        sa.Column("id", sa.Integer, nullable=False),
        sa.Column("user_id", sa.Integer, nullable=True),
        sa.Column("meta", sa.JSON, nullable=False),
        timestamp(),
        sa.PrimaryKeyConstraint("id", name="pk_rankings"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_rankings_user_id_users"),
    )

    op.create_table(
        "ranking_items",
        sa.Column("ranking_id", sa.Integer, nullable=False),
        sa.Column("message_id", sa.Integer, nullable=False),
        sa.Column("rank", sa.Integer, nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("ranking_id", "message_id", name="pk_ranking_items"),
        sa.ForeignKeyConstraint(["ranking_id"], ["rankings.id"], name="fk_ranking_items_ranking_id_rankings"),
        sa.ForeignKeyConstraint(["message_id"], ["messages.id"], name="fk_ranking_items_message_id_messages"),
    )
    op.create_index("ix_ranking_items_message_id", "ranking_items", ["message_id"])

    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer, nullable=False),
        sa.Column("message_id", sa.Integer, nullable=False),
        sa.Column("user_id", sa.Integer, nullable=True),
        sa.Column("thumbs", sa.Integer, nullable=True),
        sa.Column("comment", sa.Text, nullable=True),
        sa.Column("category", sa.String(100), nullable=True),
        timestamp(),
        sa.PrimaryKeyConstraint("id", name="pk_feedback"),
        sa.CheckConstraint("thumbs IS NULL OR thumbs IN (1, -1)", name="ck_feedback_thumbs"),
        sa.ForeignKeyConstraint(["message_id"], ["messages.id"], name="fk_feedback_message_id_messages"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_feedback_user_id_users"),
    )
    op.create_index("ix_feedback_message_id", "feedback", ["message_id"])

    op.create_table(
        "filter_reports",
        sa.Column("id", sa.Integer, nullable=False),
        sa.Column("message_id", sa.Integer, nullable=False),
        sa.Column("user_id", sa.Integer, nullable=True),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("comment", sa.Text, nullable=True),
        sa.Column("categories", sa.JSON, nullable=False),
        timestamp(),
        sa.PrimaryKeyConstraint("id", name="pk_filter_reports"),
        sa.CheckConstraint("kind IN ('false_positive', 'false_negative')", name="ck_filter_reports_kind"),
        sa.ForeignKeyConstraint(["message_id"], ["messages.id"], name="fk_filter_reports_message_id_messages"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_filter_reports_user_id_users"),
    )
    op.create_index("ix_filter_reports_message_id", "filter_reports", ["message_id"])


def downgrade() -> None:
    # Children before parents, so foreign keys never dangle.
    for table in ("filter_reports", "feedback", "ranking_items", "rankings", "messages", "conversations", "model_versions", "users"):
        op.drop_table(table)
