"""Background work of `mailkms serve` beyond the outbox: reminder sweeps, key-pool refill, CRL/OCSP,
audit checkpoints.

Both are safe on any number of nodes: reminders are claimed row by row in the database, and the
pool is topped up under an advisory lock. Key generation runs in a separate, low-priority worker
process, so it neither holds the GIL of the server nor competes with requests for the first core.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import multiprocessing
import os

from mailkms.mail import reminder_sweep
from mailkms.services import Services, generate_ders

log = logging.getLogger("mailkms.background")


def _lower_priority() -> None:
    with contextlib.suppress(OSError):
        os.nice(10)


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


async def reminder_loop(services: Services, stop: asyncio.Event, first_after: float = 2.0) -> None:
    sweep = reminder_sweep(services)
    await _wait(stop, first_after)
    while not stop.is_set():
        try:
            report = await asyncio.to_thread(sweep.sweep)
            if report.due_sent or report.final_sent or report.summary_sent:
                log.info(
                    "reminder sweep: %d reminders, %d last notices, summary %s",
                    report.due_sent,
                    report.final_sent,
                    "sent" if report.summary_sent else "not due",
                )
        except Exception:
            log.exception("reminder sweep failed; retrying at the next interval")
        await _wait(stop, services.settings.reminders.sweep_interval_seconds)


async def pool_loop(services: Services, stop: asyncio.Event) -> None:
    pool = services.key_pool
    if pool is None:
        return
    cfg = services.settings.pool
    # One low-priority process per core by default: the pool refills on both cores, and the
    # request path (whose keys the signer processes make) still comes first (nice 10).
    workers = cfg.refill_processes
    executor = concurrent.futures.ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context("spawn"), initializer=_lower_priority
    )
    loop = asyncio.get_running_loop()
    try:
        await asyncio.to_thread(pool.discard_unreadable)
        while not stop.is_set():
            try:
                want = min(cfg.refill_batch, await asyncio.to_thread(pool.deficit))
                if want:
                    shares = [want // workers + (1 if i < want % workers else 0) for i in range(workers)]
                    made = await asyncio.gather(
                        *(loop.run_in_executor(executor, generate_ders, pool.key_type, n) for n in shares if n)
                    )
                    await asyncio.to_thread(pool.store, [der for part in made for der in part])
                    continue  # keep going while short
            except Exception:
                log.exception("key-pool refill failed; retrying")
            await _wait(stop, cfg.refill_seconds)
    finally:
        executor.shutdown(wait=False, cancel_futures=True)


async def revocation_loop(services: Services, stop: asyncio.Event) -> None:
    """Every poll: drop OCSP answers of certificates revoked on any node, pick up a CRL another
    process published, and publish one when revocations wait or the current one is due. The
    publisher's row lock makes this safe on every node at once."""
    revocation = services.revocation
    while not stop.is_set():
        try:
            now = services.clock.now()
            await asyncio.to_thread(services.ocsp.sync)
            await asyncio.to_thread(revocation.refresh_latest)
            if await asyncio.to_thread(revocation.crl_due):
                view = await asyncio.to_thread(revocation.publish_crl)
                if view is not None:
                    log.info("published CRL %d with %d entries", view.number, view.entries)
            log.debug("revocation round at %s", now, extra={"at": now})
        except Exception:
            log.exception("revocation round failed; retrying")
        await _wait(stop, services.settings.revocation.poll_seconds)


async def checkpoint_loop(services: Services, stop: asyncio.Event) -> None:
    """A signed checkpoint of the audit chain's head at start and at least every
    `audit.checkpoint_seconds` (when the head moved); `serve` writes the last one at stop."""
    while not stop.is_set():
        try:
            if await asyncio.to_thread(services.write_audit_checkpoint):
                log.info("audit checkpoint appended to %s", services.checkpoints.path)
        except Exception:
            log.exception("audit checkpoint failed; retrying at the next interval")
        await _wait(stop, services.settings.audit.checkpoint_seconds)


def start(services: Services, stop: asyncio.Event) -> list[asyncio.Task[None]]:
    tasks = [
        asyncio.create_task(pool_loop(services, stop)),
        asyncio.create_task(revocation_loop(services, stop)),
        asyncio.create_task(checkpoint_loop(services, stop)),
    ]
    if services.settings.reminders.enabled:
        tasks.append(asyncio.create_task(reminder_loop(services, stop)))
    return tasks
