"""Alembic migrations of the message service's database (revision ids ``message_NNNN``)."""
