"""Alembic environment: runs on the connection `catalog db upgrade` hands over."""

from alembic import context

from catalog.db import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, compare_type=True)
with context.begin_transaction():
    context.run_migrations()
