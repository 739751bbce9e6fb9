"""Alembic migration history of the user service's database (applied at start-up)."""
