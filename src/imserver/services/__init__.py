"""The six service boundaries: gateway, user, message, room, file, notification.

Each service package holds ``api.py`` (a ``typing.Protocol`` and its request/response
structs), its implementation (``service.py``), its store (``store.py``) and its own
Alembic migrations. No service reads another's tables; they meet only through APIs.
"""
