"""Revisions of the room service's schema, one file each, oldest first."""
