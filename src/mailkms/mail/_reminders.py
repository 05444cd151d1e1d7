"""Wiring of the reminder sweep with the template composer (the mail layer owns the templates)."""

from __future__ import annotations

from collections.abc import Sequence

from cryptography import x509

from mailkms.mail._outbox import node_name
from mailkms.mail._templates import TemplateComposer
from mailkms.pki import PrivateKey
from mailkms.services import ReminderSweep, Services


def reminder_sweep(services: Services, node: str | None = None) -> ReminderSweep:
    ca = services.ca

    def signer() -> tuple[x509.Certificate, PrivateKey, Sequence[x509.Certificate]]:
        s = ca.require_mail_signer()
        return s.certificate, s.private_key, list(ca.chain)

    composer = TemplateComposer(signer, services.settings.server.effective_mail_from, services.clock)
    return ReminderSweep(services.db, services.settings, services.clock, services.audit, composer, node or node_name())
