"""The server's key-pool refill: keys made by its low-priority processes, shared out over them."""

from __future__ import annotations

import asyncio
import time

from mailkms.cli._background import pool_loop
from mailkms.config import Settings
from mailkms.services import Services


def test_the_refill_processes_fill_the_pool_to_its_size_and_no_further(settings: Settings, clock) -> None:  # type: ignore[no-untyped-def]
    configured = settings.model_copy(
        update={"pool": settings.pool.model_copy(update={"size": 5, "refill_batch": 5, "refill_processes": 2})}
    )
    services = Services.build(configured, clock)
    assert services.key_pool is not None
    pool = services.key_pool

    async def run() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(pool_loop(services, stop))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and await asyncio.to_thread(pool.size) < 5:
            await asyncio.sleep(0.2)
        await asyncio.sleep(0.5)  # a round more: it must not overfill
        stop.set()
        await task

    try:
        asyncio.run(run())
        assert pool.size() == 5
        with services.db.transaction() as session:
            keys = [pool.take(session, pool.key_type) for _ in range(5)]
        assert all(k is not None for k in keys)
        assert len({k.public_key().public_numbers().n for k in keys if k is not None}) == 5  # five distinct keys
    finally:
        services.close()
