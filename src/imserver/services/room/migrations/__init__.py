"""Alembic migration history of the room service's database (applied at start-up)."""
