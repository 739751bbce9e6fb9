"""End-to-end benchmarks of IMServer: ``python -m benchmarks <scenario>``.

Every scenario starts a real ``imserver serve`` process on free ports, drives it from
separate load-generator processes through :mod:`imserver.client`, measures throughput,
latency and CPU, prints a table and writes the results to
``benchmarks/results/<scenario>-<timestamp>.json``.

Modules:

- :mod:`benchmarks.harness` -- what every scenario shares: the server process, free
  ports, user provisioning, CPU/RSS sampling, latency percentiles, worker-process
  plumbing, progress display, py-spy profiling, table and JSON output.
- :mod:`benchmarks.dm` -- persisted direct messages between pairs of users.

``bench_message_store.py`` is a separate, in-process micro-benchmark of the message
write path (no network); run it as a script.
"""
