"""IMServer: an instant-messaging backend.

The package is layered (see docs/architecture.md): ``utils`` and ``protocol`` have no
I/O, ``network`` moves bytes, ``core`` composes the services, ``storage`` holds the
backends, and ``services`` holds the six service boundaries.
"""

__version__ = "0.1.0"
