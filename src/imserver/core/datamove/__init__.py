"""``imserver migrate-data``: an embedded deployment's SQLite data moved to a database
server (PostgreSQL, MySQL/MariaDB).

* :mod:`~imserver.core.datamove.source` — the SQLite data directory, held
  exclusively for the whole move (a running server refuses it, and no server can
  start on it meanwhile).
* :mod:`~imserver.core.datamove.tables` — what each service's database holds and how
  a table is copied (in batches, the search index and the seq counters rebuilt on
  the target).
* :mod:`~imserver.core.datamove.verify` — row counts and an order-independent
  checksum of every table, on both sides.
* :mod:`~imserver.core.datamove.command` — the command: the refusals and their exit
  statuses, the progress bar, the report.
"""
