"""Waiting in a test for something another task or process does."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest


async def until(check: Callable[[], bool], what: str, limit: float = 15.0) -> None:
    """Wait for ``check()``; fail naming ``what`` after ``limit`` seconds."""
    try:
        async with asyncio.timeout(limit):
            while True:
                if check():
                    return
                await asyncio.sleep(0.05)
    except TimeoutError:
        pytest.fail(f"not within {limit} s: {what}")
