"""Revisions of the message service's schema."""
