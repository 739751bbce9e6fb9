"""Alembic environment of the message service (shared body in ``imserver.storage``)."""

from imserver.storage.migration_env import run

run()
