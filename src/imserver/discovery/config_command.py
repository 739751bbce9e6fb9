"""``imserver config get NAME | set NAME VALUE | list``: the dynamic settings in etcd.

Output, one line per setting: ``NAME = VALUE (revision R)``, R the etcd revision
that wrote it; a setting not stored in etcd shows ``(not set)``, and its servers use
their configured value. ``set`` prints the value stored and the revision of the
write, which every watching server logs when it applies it.

Exit codes: 0 done; 2 a usage error or a refused name or value (unknown, static,
ill-typed), nothing written; 1 etcd unreachable (or no endpoint configured).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TextIO

import msgspec

from imserver.discovery.config_centre import get_setting, list_settings, set_setting
from imserver.discovery.etcd import EtcdClient, EtcdUnavailable
from imserver.utils.errors import BadRequest

EXIT_OK = 0
EXIT_UNREACHABLE = 1
EXIT_USAGE = 2


def _shown(value: Any) -> str:
    return msgspec.json.encode(value).decode()


async def run_config_command(
    endpoints: Sequence[str],
    prefix: str,
    action: str,
    name: str | None,
    value: str | None,
    *,
    request_timeout: float,
    out: TextIO,
    err: TextIO,
) -> int:
    """Run one ``imserver config`` action; returns the exit code."""
    if not endpoints:
        print("imserver config: no etcd endpoint: give --etcd URL or [etcd] endpoints", file=err)
        return EXIT_UNREACHABLE
    client = EtcdClient(endpoints, timeout=request_timeout)
    try:
        if action == "set":
            assert name is not None and value is not None
            stored, revision = await set_setting(client, prefix, name, value)
            print(f"{name} = {_shown(stored)} (revision {revision})", file=out)
        elif action == "get":
            assert name is not None
            setting, _ = await get_setting(client, prefix, name)
            if setting.revision:
                print(f"{name} = {_shown(setting.value)} (revision {setting.revision})", file=out)
            else:
                print(f"{name} (not set)", file=out)
        else:
            settings, revision = await list_settings(client, prefix)
            for setting in settings:
                if setting.revision:
                    line = f"{setting.name} = {_shown(setting.value)} (revision {setting.revision})"
                else:
                    line = f"{setting.name} (not set)"
                print(line, file=out)
            print(f"# etcd revision {revision}", file=out)
    except BadRequest as exc:
        print(f"imserver config: {exc.message}", file=err)
        return EXIT_USAGE
    except EtcdUnavailable as exc:
        print(f"imserver config: {exc}", file=err)
        return EXIT_UNREACHABLE
    finally:
        await client.close()
    return EXIT_OK
