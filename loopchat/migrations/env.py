"""Alembic environment: runs migrations on the connection the Store hands us.

The Store opens the connection (so SQLite gets its WAL / foreign-key pragmas) and passes
it in `config.attributes["connection"]`. Running alembic from the command line with a
`sqlalchemy.url` option also works, for development.
"""

from alembic import context
from sqlalchemy import create_engine

from loopchat.data.schema import Base

config = context.config


def run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,  # lets autogenerate draft new revisions
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("loopchat migrations run online only (the Store passes a connection)")

connection = config.attributes.get("connection")
if connection is not None:
    run(connection)
else:
    engine = create_engine(config.get_main_option("sqlalchemy.url"))
    with engine.begin() as connection:
        run(connection)
    engine.dispose()
