"""Revisions of the notification service's schema, one file each, oldest first."""
