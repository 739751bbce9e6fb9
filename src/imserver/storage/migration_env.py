"""The body of every service's Alembic ``env.py``: online migrations on one connection."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, event, pool

from imserver.storage.sql import set_sqlite_pragmas


def run() -> None:
    """Run the migrations Alembic has selected against ``sqlalchemy.url``."""
    url = context.config.get_main_option("sqlalchemy.url")
    assert url is not None
    engine = create_engine(url, poolclass=pool.NullPool)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", set_sqlite_pragmas)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            render_as_batch=True,
            version_table=context.config.get_main_option("version_table") or "alembic_version",
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()
