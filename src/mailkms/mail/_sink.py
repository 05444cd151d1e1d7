"""The embedded mail sink: an SMTP server on loopback filing mail into per-recipient Maildirs.

DATA/mailboxes/ADDRESS/{tmp,new,cur}. The file name comes from the Message-ID, so a message
delivered twice (a crash between sending and marking sent) lands once.
"""

from __future__ import annotations

import email.policy
import hashlib
import logging
import os
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

log = logging.getLogger("mailkms.sink")


def mailbox_dir(root: Path, address: str) -> Path:
    safe = address.strip().lower()
    if "/" in safe or safe.startswith(".") or not safe:
        raise ValueError(f"refusing to file mail for {address!r}")
    return root / safe


def file_into_maildir(root: Path, recipient: str, data: bytes) -> Path | None:
    """Maildir delivery (write to tmp/, rename into new/). None when already delivered."""
    headers = BytesHeaderParser(policy=email.policy.default).parsebytes(data)
    message_id = str(headers.get("Message-ID", "")).strip()
    key = hashlib.sha256((message_id or hashlib.sha256(data).hexdigest()).encode()).hexdigest()[:32]
    box = mailbox_dir(root, recipient)
    for sub in ("tmp", "new", "cur"):
        (box / sub).mkdir(parents=True, exist_ok=True)
    for sub in ("new", "cur"):
        if any(p.name.startswith(key) for p in (box / sub).iterdir()):
            return None
    tmp = box / "tmp" / f"{key}.mailkms"
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    final = box / "new" / f"{key}.mailkms"
    os.replace(tmp, final)
    return final


class MaildirHandler:
    def __init__(self, root: Path) -> None:
        self.root = root

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data = envelope.original_content or b""
        if isinstance(data, str):
            data = data.encode()
        for rcpt in envelope.rcpt_tos:
            try:
                path = file_into_maildir(self.root, rcpt, data)
            except (OSError, ValueError) as exc:
                log.warning("sink could not file mail for %s: %s", rcpt, exc)
                return "451 Requested action aborted: local error in processing"
            log.info("sink filed mail for %s%s", rcpt, "" if path else " (duplicate, dropped)")
        return "250 Message accepted for delivery"


class MailSink:
    """aiosmtpd Controller in its own thread, bound to loopback."""

    def __init__(self, root: Path, host: str = "127.0.0.1", port: int = 2525) -> None:
        self.root = root
        self._controller = Controller(MaildirHandler(root), hostname=host, port=port, decode_data=False)

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._controller.start()

    def stop(self) -> None:
        self._controller.stop()

    def __enter__(self) -> MailSink:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
