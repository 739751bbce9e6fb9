"""Alembic migration history of the file service's database (applied at start-up)."""
