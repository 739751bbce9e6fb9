"""Push providers, each behind :class:`~imserver.services.notification.providers.base.Provider`."""
