"""Helpers for the project's tests and benchmarks, not used by the server itself.

- :mod:`~imserver.testing.process`: a real ``imserver serve`` process on free ports,
  started from a configuration mapping, awaited on ``GET /readyz`` and stopped with a
  signal; the end-to-end tests and the benchmarks both run their servers through it.
- :mod:`~imserver.testing.sessions`: a gateway on real services over SQLite files,
  driven without sockets (payloads in, decoded frames out).
"""
