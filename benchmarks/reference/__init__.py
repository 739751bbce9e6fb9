"""Reference baselines: what this machine does without IMServer in the way.

- :mod:`benchmarks.reference.echo_server` -- a minimal asyncio + uvloop length-prefixed
  TCP server (echo or fan-out), the Python limit for the same work;
- :mod:`benchmarks.reference.clients` -- the load-generator process bodies for it, for
  nats-server fan-out (publisher through nats-py) and the SQLite group-commit loop.

:mod:`benchmarks.baselines` runs them and reports the figures the suite divides by.
"""
