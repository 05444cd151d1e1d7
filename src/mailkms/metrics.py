"""Prometheus metrics of one server process (prometheus-client, default registry).

Counters count what this process did (Prometheus sums them over nodes); gauges that describe the
shared store (outbox depth and age, key-pool size) are read from the database at scrape time by
a collector that `mailkms.api` registers. Other areas add their own series here (CRL age, OCSP
requests): `CRL_AGE` and `OCSP_REQUESTS` are the hooks for them.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import Counter, Gauge, Histogram

CERTIFICATES_ISSUED = Counter(
    "mailkms_certificates_issued_total", "Certificates issued and committed, by kind", ["kind"]
)
RENEWALS = Counter("mailkms_renewals_total", "Update requests accepted (a new pair issued)")
REFUSALS = Counter("mailkms_refusals_total", "Requests refused, by action and problem type", ["action", "reason"])
MAIL_SENT = Counter("mailkms_mail_sent_total", "Mails handed to SMTP and marked sent")
MAIL_DEFERRED = Counter("mailkms_mail_deferred_total", "Mails put back in the queue after a failed round")
MAIL_SEND_FAILURES = Counter(
    "mailkms_outbox_send_failures_total",
    "SMTP sessions that failed, by kind (auth, tls-verify, connect, timeout, recipient-refused, ...)",
    ["kind"],
)
REMINDERS = Counter("mailkms_reminders_total", "Reminder mails queued, by kind", ["kind"])
POOL_TAKEN = Counter("mailkms_keypool_taken_total", "Encryption keys taken from the pool")
POOL_FALLBACK = Counter(
    "mailkms_keypool_fallback_total", "Encryption keys generated inline because the pool was empty or off"
)
POOL_GENERATED = Counter("mailkms_keypool_generated_total", "Keys generated into the pool by this process")
RATE_LIMITED = Counter(
    "mailkms_rate_limited_total", "Requests answered 429 by the per-client rate limit, by endpoint group", ["group"]
)
REQUEST_SECONDS = Histogram("mailkms_http_request_seconds", "HTTP request duration", ["method", "route", "status"])
# Hooks for the CRL/OCSP area (set/inc them from there).
CRL_AGE = Gauge("mailkms_crl_age_seconds", "Seconds since the current CRL's thisUpdate", ["crl"])
ROOT_CRL_REMAINING = Gauge(
    "mailkms_root_crl_next_update_seconds",
    "Seconds until the root CRL's nextUpdate (negative once passed); with an offline root a ceremony must sign the next",
)
ROOT_CRL_DUE = Gauge(
    "mailkms_root_crl_due", "1 when the offline root's CRL is within [revocation] root_crl_warn_days of its nextUpdate"
)
OCSP_REQUESTS = Counter("mailkms_ocsp_requests_total", "OCSP requests answered, by status", ["status"])
OCSP_CACHE_BYTES = Gauge("mailkms_ocsp_cache_bytes", "Bytes held by the cache of signed OCSP answers (accounted)")
OCSP_CACHE_ENTRIES = Gauge("mailkms_ocsp_cache_entries", "Signed OCSP answers in the cache")
OCSP_PENDING = Gauge("mailkms_ocsp_pending", "OCSP requests running or waiting on the OCSP signing threads")

# Series that exist from the start, so dashboards and rate() see zeros rather than gaps.
for _kind in ("signing", "encryption"):
    CERTIFICATES_ISSUED.labels(kind=_kind)
for _kind in ("due", "final"):
    REMINDERS.labels(kind=_kind)
for _status in ("good", "revoked", "unused", "unauthorized", "malformed", "tryLater"):
    OCSP_REQUESTS.labels(status=_status)
for _group in ("token", "signed", "est"):
    RATE_LIMITED.labels(group=_group)


def observe_audit(action: str, details: Mapping[str, object]) -> None:
    """Called after a transaction commits, once per audit record it held."""
    if action == "certificate.issued":
        CERTIFICATES_ISSUED.labels(kind=str(details.get("kind", "unknown"))).inc()
    elif action == "renewal.received":
        RENEWALS.inc()
    elif action.endswith(".refused"):
        REFUSALS.labels(action=action.removesuffix(".refused"), reason=str(details.get("reason", "unknown"))).inc()
    elif action == "mail.sent":
        MAIL_SENT.inc()
    elif action == "mail.deferred":
        MAIL_DEFERRED.inc()
    elif action.startswith("reminder."):
        REMINDERS.labels(kind=action.removeprefix("reminder.")).inc()
