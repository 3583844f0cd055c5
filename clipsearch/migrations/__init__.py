"""Alembic migrations of the catalog schema (SQLite and PostgreSQL); run by clipsearch.migrate, never imported eagerly."""
