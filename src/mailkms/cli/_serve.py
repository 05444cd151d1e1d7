"""`mailkms serve`: HTTPS API, plain-http publication, mail sink and background work in one process."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import signal
import threading
from collections.abc import Callable, Iterator

import uvicorn

from mailkms.api import OCSPListeners, create_app, create_http_app, create_metrics_app
from mailkms.cli import _background
from mailkms.mail import FAILURE_KINDS, MailSink, OutboxWorker, sender_for
from mailkms.services import CRLWorkers, Services

log = logging.getLogger("mailkms.serve")

IDENTITY_CHECK_EVERY = dt.timedelta(days=1)


class _Server(uvicorn.Server):
    """Several servers share one loop; signals are handled once, by `serve` below."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def _outbox_loop(worker: OutboxWorker, stop: asyncio.Event, interval: float, batch: int = 50) -> None:
    while not stop.is_set():
        try:
            await asyncio.to_thread(worker.run_once, batch)
        except Exception:
            log.exception("outbox round failed; retrying")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval)


async def _housekeeping_loop(services: Services, stop: asyncio.Event) -> None:
    """Anonymous refusals into the audit chain as counts; spent nonces out of the replay set; sealed
    EST keys out of the store once their hand-over hour has ended; CMP's seen nonces, closed
    transactions and the sealed copies of tokens that can no longer be used."""
    every = services.settings.limits.refusal_flush_seconds
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=every)
        if stop.is_set():
            return  # serve() writes the last counts after the servers stopped
        try:
            now = services.clock.now()
            await asyncio.to_thread(services.refusals.flush)
            nonces = await asyncio.to_thread(services.nonces.purge)
            keys = await asyncio.to_thread(services.est.purge)  # sealed EST keys whose hour has ended
            log.debug(
                "housekeeping at %s: %d spent nonces, %d sealed keys purged", now, nonces, keys, extra={"at": now}
            )
            await asyncio.to_thread(services.cmp.purge)  # CMP nonces, old transactions, sealed tokens no one can use
            await asyncio.to_thread(services.acme.purge)  # ACME orders that ended without a certificate
        except Exception:
            log.exception("housekeeping failed; retrying")


def _limits(services: Services) -> dict[str, object]:
    """What uvicorn itself bounds: connections, idle keep-alive, the request head, proxies."""
    limits = services.settings.limits
    return {
        "limit_concurrency": limits.max_concurrency,
        "timeout_keep_alive": limits.keep_alive_seconds,
        "h11_max_incomplete_event_size": limits.max_header_bytes,
        "proxy_headers": bool(limits.trusted_proxies),
        "forwarded_allow_ips": list(limits.trusted_proxies) or None,
    }


async def _daily_loop(services: Services, stop: asyncio.Event, reload_tls: Callable[[], None], every: float) -> None:
    """Daily (every `every` seconds): server certificates and the root CRL, judged on the services'
    clock; a renewed TLS certificate is loaded into the running server for new handshakes."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=every)
        if stop.is_set():
            return
        try:
            now = services.clock.now()
            renewed = await asyncio.to_thread(services.ensure_server_identities)
            if "tls" in renewed:
                reload_tls()
            if renewed:
                log.info("renewed server identities: %s", ", ".join(renewed))
            purged = await asyncio.to_thread(services.recovery.purge)  # held recoveries whose token died
            log.debug(
                "daily maintenance at %s: renewed %s, %s recoveries purged", now, renewed, purged, extra={"at": now}
            )
        except Exception:
            log.exception("daily maintenance failed")


async def _ca_watch_loop(
    services: Services, stop: asyncio.Event, wake: asyncio.Event, reload_tls: Callable[[], None], every: float
) -> None:
    """What `mailkms ca import` wrote is taken without a restart: the CA files are looked at every
    `every` seconds ([ca] reload_check_seconds), and at once on SIGHUP (`wake`)."""
    stamp = services.ca.files_stamp()
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), timeout=every)
        if stop.is_set():
            return
        forced = wake.is_set()
        wake.clear()
        now = services.ca.files_stamp()
        if now == stamp and not forced:
            continue
        stamp = now
        try:
            changed = await asyncio.to_thread(services.reload_ca)
        except Exception:
            log.exception("could not take the changed CA files; the server goes on with the ones it has")
            continue
        if "tls" in changed:
            reload_tls()
        if changed:
            log.info("CA files changed: took %s without a restart", ", ".join(changed))
        elif forced:
            log.info("SIGHUP: the CA files are unchanged")


async def serve(
    services: Services,
    *,
    bind: str,
    https_port: int,
    http_port: int,
    outbox_interval: float | None = None,
    maintenance_every: float = IDENTITY_CHECK_EVERY.total_seconds(),
    stop: asyncio.Event | None = None,
) -> None:
    """Until SIGINT/SIGTERM (in the main thread) or until `stop` is set (tests run it in-process,
    on an injected clock, with a short `maintenance_every`)."""
    settings = services.settings
    renewed = services.ensure_server_identities()
    if renewed:
        log.info("renewed server identities at start: %s", ", ".join(renewed))
    workers: CRLWorkers | None = None
    if settings.revocation.crl_workers:  # CRLs are built beside the server, not under its GIL
        workers = CRLWorkers(settings.effective_database_url, services.ca, settings.revocation.crl_workers)
        workers.start()
        services.revocation.builder = workers
    listeners: OCSPListeners | None = None
    if settings.revocation.ocsp_address is not None:
        listeners = OCSPListeners(settings, services.ca.at_rest_passphrase)
        listeners.start()
        log.info(
            "OCSP-only listener on %s in %d processes",
            settings.revocation.ocsp_listen,
            settings.revocation.ocsp_processes,
        )
    published = services.revocation.publish_crl()  # only if none yet, revocations wait, or it is due
    if published is not None:
        log.info("published CRL %d with %d entries", published.number, published.entries)
    services.revocation.refresh_latest()
    stop = stop or asyncio.Event()
    sink: MailSink | None = None
    if settings.smtp.mode == "sink":
        sink = MailSink(settings.data_dir / "mailboxes", "127.0.0.1", settings.smtp.sink_port)
        sink.start()
        log.info("mail sink on 127.0.0.1:%d filing into %s", settings.smtp.sink_port, settings.data_dir / "mailboxes")
    # Mails that waited on a setting of ours (login, TLS) are due at once after a restart: the
    # administrator restarts because the setting was fixed.
    retried = services.outbox.retry(kinds=[k.code for k in FAILURE_KINDS.values() if k.config])
    if retried:
        log.info("%d mail(s) that failed on the relay settings are due again", retried)
    worker = OutboxWorker(
        services.db,
        sender_for(settings.smtp),
        services.clock,
        services.audit,
        retry_base=settings.smtp.retry_base_seconds,
        retry_max=settings.smtp.retry_max_seconds,
        lease=dt.timedelta(seconds=settings.outbox.lease_seconds),
        opener=services.outbox_sealer.open,
    )
    paths = services.ca.paths
    https = _Server(
        uvicorn.Config(
            create_app(services),
            host=bind,
            port=https_port,
            ssl_certfile=str(paths.tls_cert),
            ssl_keyfile=str(paths.tls_key),
            ssl_keyfile_password=services.ca.tls_key_password,
            log_level="info",
            log_config=None,
            access_log=True,
            **_limits(services),  # type: ignore[arg-type]
        )
    )
    servers = [https]
    if http_port:
        servers.append(
            _Server(
                uvicorn.Config(
                    create_http_app(services),
                    host=bind,
                    port=http_port,
                    log_level="warning",
                    log_config=None,
                    **_limits(services),  # type: ignore[arg-type]
                )
            )
        )
    metrics_at = settings.metrics.listen_address
    if metrics_at is not None:  # /metrics only there (README, Metrics)
        servers.append(
            _Server(
                uvicorn.Config(
                    create_metrics_app(services),
                    host=metrics_at[0],
                    port=metrics_at[1],
                    log_level="warning",
                    log_config=None,
                    timeout_keep_alive=5,
                )
            )
        )
    loop = asyncio.get_running_loop()

    wake = asyncio.Event()

    def _stop() -> None:
        stop.set()
        wake.set()
        for server in servers:
            server.should_exit = True

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, _stop)
        loop.add_signal_handler(signal.SIGHUP, wake.set)  # take what `mailkms ca import` wrote, now

    async def _stopper() -> None:
        await stop.wait()
        _stop()

    def reload_tls() -> None:
        # A running server takes the renewed certificate for new handshakes: same SSLContext, new chain.
        context = https.config.ssl
        if context is not None:
            context.load_cert_chain(str(paths.tls_cert), str(paths.tls_key), services.ca.tls_key_password)

    tasks = [
        asyncio.create_task(
            _outbox_loop(worker, stop, outbox_interval or settings.outbox.poll_seconds, settings.outbox.batch_size)
        ),
        asyncio.create_task(_daily_loop(services, stop, reload_tls, maintenance_every)),
        asyncio.create_task(_ca_watch_loop(services, stop, wake, reload_tls, settings.ca.reload_check_seconds)),
        asyncio.create_task(_stopper()),
        asyncio.create_task(_housekeeping_loop(services, stop)),
        *_background.start(services, stop),
    ]
    log.info(
        "mailkms serving https://%s:%d%s%s",
        bind,
        https_port,
        f" and http://{bind}:{http_port}" if http_port else "",
        f", /metrics on http://{settings.metrics.listen}" if metrics_at else "",
    )
    try:
        await asyncio.gather(*(s.serve() for s in servers))
    finally:
        _stop()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if sink is not None:
            sink.stop()
        services.ocsp.close()
        if workers is not None:
            workers.close()
        if listeners is not None:
            listeners.stop()
        try:  # the head at every stop, signed, outside the store
            services.write_audit_checkpoint()
        except Exception:
            log.exception("audit checkpoint at stop failed")
        try:
            services.refusals.flush()  # the counts of the last period reach the audit chain too
        except Exception:
            log.exception("could not write the last refusal counts")
        services.close()
