"""`mailkms doctor`: what in this deployment weakens key custody, without opening any key.

Each finding is a warning, or critical when it defeats a secret in production (`[ca] production`),
or defeats one whatever the mode (a world-readable configuration that holds the SMTP password).
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from sqlalchemy import select

from mailkms.clock import Clock
from mailkms.config import CA_CREDENTIAL, CA_PASSPHRASE_FD_ENV, CONFIG_FILE, Settings
from mailkms.services._ca import CAPaths
from mailkms.services._recovery import BOOTSTRAP_FILE, BOOTSTRAP_OFFICER, BOOTSTRAP_PASSPHRASE_FILE
from mailkms.store import Database, RecoveryCeremony, RecoveryHead

Severity = Literal["critical", "warning"]


@dataclass(frozen=True)
class Finding:
    code: str
    severity: Severity
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "severity": self.severity, "message": self.message}


def passphrase_source(settings: Settings, paths: CAPaths) -> str:
    """Where the CA passphrase would come from (nothing is read)."""
    if os.environ.get(CA_PASSPHRASE_FD_ENV):
        return "file descriptor"
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if directory and (Path(directory) / CA_CREDENTIAL).is_file():
        return "systemd credential"
    if settings.ca_passphrase:
        return "environment or option"
    if paths.passphrase_file.exists():
        return "file beside the keys"
    return "none"


def _bootstrap_current(db: Database, recovery_dir: Path) -> bool:
    with db.transaction() as session:
        head = session.get(RecoveryHead, 1)
        if head is None:  # not adopted yet: the bootstrap files are the ceremony
            return (recovery_dir / BOOTSTRAP_FILE).exists()
        names = session.execute(
            select(RecoveryCeremony.officer_names).where(RecoveryCeremony.id == head.ceremony_id)
        ).scalar_one_or_none()
    return names is not None and json.loads(names) == [BOOTSTRAP_OFFICER]


def _last_checkpoint(path: Path) -> dt.datetime | None:
    try:
        with path.open("rb") as fh:
            fh.seek(max(0, path.stat().st_size - 4096))
            lines = [line for line in fh.read().splitlines() if line.strip()]
        at = json.loads(lines[-1])["at"] if lines else None
        return dt.datetime.strptime(at, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC) if at else None
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def _root_crl_findings(settings: Settings, paths: CAPaths, clock: Clock) -> list[Finding]:
    """With the root offline no server process can sign the root CRL: say when the next ceremony is due."""
    if not paths.exists() or not paths.root_offline:
        return []
    if not paths.root_crl.exists():
        return [
            Finding("root-crl-missing", "critical", f"the root is offline and there is no root CRL at {paths.root_crl}")
        ]
    crl = x509.load_der_x509_crl(paths.root_crl.read_bytes())
    next_update = crl.next_update_utc
    if next_update is None:
        return []
    left = next_update - clock.now()
    if left <= dt.timedelta(0):
        return [
            Finding(
                "root-crl-expired",
                "critical",
                f"the root CRL expired at {next_update:%Y-%m-%d %H:%M} UTC: relying parties that check it refuse "
                "every certificate; sign one at a root ceremony and `mailkms ca import` it",
            )
        ]
    if left < dt.timedelta(days=settings.revocation.root_crl_warn_days):
        return [
            Finding(
                "root-crl-due",
                "warning",
                f"the root CRL expires at {next_update:%Y-%m-%d %H:%M} UTC ({left.days} days): the root is offline, "
                "so sign the next at a root ceremony (`mailkms ca root-ceremony sign-crl`) and `mailkms ca import` it",
            )
        ]
    return []


def health_checks(settings: Settings, db: Database | None, clock: Clock) -> list[Finding]:
    paths = CAPaths(settings.data_dir)
    production = settings.ca.production
    custody: Severity = "critical" if production else "warning"
    found: list[Finding] = []

    if not production:
        found.append(
            Finding(
                "production-off",
                "warning",
                "not in production mode ([ca] production = true, MAILKMS_CA__PRODUCTION=1 or --production): "
                "the CA passphrase may sit beside the CA keys",
            )
        )
    if paths.passphrase_file.exists():
        found.append(
            Finding(
                "ca-passphrase-file",
                custody,
                f"{paths.passphrase_file} holds the CA passphrase beside the CA keys: any copy of the data folder "
                "is the whole CA. Give it by --passphrase-fd, a systemd credential or MAILKMS_CA_PASSPHRASE and "
                "delete the file",
            )
        )
    elif passphrase_source(settings, paths) == "none" and paths.exists():
        found.append(Finding("ca-passphrase-missing", "warning", "no CA passphrase given to this process"))

    config = settings.data_dir / CONFIG_FILE
    if config.exists():
        mode = config.stat().st_mode & 0o777
        if mode & 0o077:
            severity: Severity = "critical" if settings.smtp.password or production else "warning"
            found.append(
                Finding(
                    "config-mode",
                    severity,
                    f"{config} is mode {mode:04o}: it can hold the SMTP password; chmod 600",
                )
            )

    recovery_dir = paths.recovery_dir
    if (recovery_dir / BOOTSTRAP_PASSPHRASE_FILE).exists():
        found.append(
            Finding(
                "bootstrap-passphrase-file",
                custody,
                f"{recovery_dir / BOOTSTRAP_PASSPHRASE_FILE} holds the bootstrap share's passphrase beside the "
                "share: any copy of the data folder opens every archived key. Move both off this machine and run "
                "`mailkms recovery init`",
            )
        )
    if db is not None and _bootstrap_current(db, recovery_dir):
        found.append(
            Finding(
                "bootstrap-ceremony",
                custody,
                "the archive is still guarded by the 1-of-1 bootstrap ceremony of `mailkms init` (its share in "
                f"{recovery_dir}): appoint officers with `mailkms recovery init --officers N --threshold M`",
            )
        )

    found.extend(_root_crl_findings(settings, paths, clock))

    checkpoints = settings.checkpoints_path
    if not paths.audit_public_key.exists() and paths.exists():
        found.append(
            Finding("audit-checkpoint-key", "warning", "no audit checkpoint key yet (made at the next `serve`)")
        )
    if checkpoints.resolve().is_relative_to(settings.data_dir.resolve()):
        found.append(
            Finding(
                "audit-checkpoints-inside-data",
                "warning",
                f"audit checkpoints are written to {checkpoints}, inside the data folder: point "
                "[audit] checkpoints_file at storage the database's administrators cannot rewrite, or copy it off",
            )
        )
    last = _last_checkpoint(checkpoints)
    if last is None:
        found.append(Finding("audit-no-checkpoint", "warning", f"no signed audit checkpoint in {checkpoints} yet"))
    elif clock.now() - last > dt.timedelta(seconds=2 * settings.audit.checkpoint_seconds):
        found.append(
            Finding(
                "audit-checkpoint-stale",
                "warning",
                f"the last audit checkpoint is from {last:%Y-%m-%d %H:%M} UTC (is `mailkms serve` running?)",
            )
        )
    return found
