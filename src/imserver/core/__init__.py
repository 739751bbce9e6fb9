"""The composition root (Server), sessions, the hub, the op router, and edge policy."""
