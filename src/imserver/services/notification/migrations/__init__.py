"""Alembic migration history of the notification service's database (applied at start-up)."""
