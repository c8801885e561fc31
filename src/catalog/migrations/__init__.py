"""Alembic migrations of the catalog schema (run by `catalog db upgrade`)."""
