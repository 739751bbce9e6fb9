"""Revisions of the user service's schema, one file each, oldest first."""
