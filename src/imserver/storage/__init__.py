"""Backends, one small interface per capability, and the SQL/migration helpers."""
