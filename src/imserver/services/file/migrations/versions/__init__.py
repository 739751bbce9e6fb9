"""Revisions of the file service's schema, one file each, oldest first."""
