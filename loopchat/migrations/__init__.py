"""Alembic migrations for the loopchat store, shipped inside the package.

`loopchat.data.store.Store` runs `upgrade head` through alembic's Python API with
script_location pointing at this folder, so no alembic.ini is needed at runtime.

To write a new migration: change loopchat/data/schema.py, draft a revision with
alembic's autogenerate (recipe in `loopchat.data.store.alembic_config`), then edit the
generated file in versions/ by hand: autogenerate is a draft, not the truth.
tests/test_store.py::test_migrations_match_models fails until models and migrations agree.
"""
