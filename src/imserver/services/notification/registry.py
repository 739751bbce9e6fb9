"""The push providers a configuration enables, built from the ``[push]`` settings.

A provider's module is imported only when its section turns it on, so a server that
uses none of them loads none of their libraries (HTTP/2, JWT, Web Push crypto):

- ``webhook``: ``push.webhook.url`` is set — ``providers/webhook.py``;
- ``webpush``: ``push.webpush.enabled`` — ``providers/webpush.py``, with the VAPID keys
  ``providers/vapid.py`` loads (or creates on first start) under the data directory;
- ``fcm``: ``push.fcm.service_account_file`` is set — ``providers/fcm.py``;
- ``apns``: ``push.apns.key_file`` is set — ``providers/apns.py``.

A provider whose module is not installed in this build is left out (logged): its
``push.register`` answers ``bad_request`` like any provider that is off.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imserver.services.notification.providers.base import Provider
from imserver.utils.config import PushConfig

logger = logging.getLogger(__name__)

_PACKAGE = "imserver.services.notification.providers"


@dataclass(frozen=True)
class Providers:
    """The enabled providers by name, and the Web Push application server key (empty
    when Web Push is off)."""

    by_name: dict[str, Provider]
    vapid_key: str = ""


def _module(name: str) -> Any:
    try:
        return importlib.import_module(f"{_PACKAGE}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{_PACKAGE}.{name}":
            raise
        logger.warning("push provider %s is configured but not part of this build", name)
        return None


def build_providers(config: PushConfig, data_dir: Path) -> Providers:
    """The providers ``config`` enables. Blocking (key files are read): call it once
    at start-up."""
    found: dict[str, Provider] = {}
    vapid_key = ""
    if config.webhook.url:
        module = _module("webhook")
        if module is not None:
            found["webhook"] = module.WebhookProvider(config.webhook)
    if config.webpush.enabled:
        module = _module("webpush")
        vapid = _module("vapid") if module is not None else None
        if module is not None and vapid is not None:
            keys = vapid.load_vapid_keys(data_dir)
            found["webpush"] = module.WebPushProvider(config.webpush, keys)
            vapid_key = str(keys.application_server_key)
    if config.fcm.service_account_file:
        module = _module("fcm")
        if module is not None:
            found["fcm"] = module.FcmProvider(config.fcm)
    if config.apns.key_file:
        module = _module("apns")
        if module is not None:
            found["apns"] = module.ApnsProvider(config.apns)
    return Providers(by_name=found, vapid_key=vapid_key)
