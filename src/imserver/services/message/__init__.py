"""The message service: sequences, storage, idempotency, history, markers, search."""
