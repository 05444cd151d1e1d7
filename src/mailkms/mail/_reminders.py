"""Wiring of the reminder sweep and the token mailer with the template composer (the mail layer owns the templates)."""

from __future__ import annotations

from collections.abc import Sequence

from cryptography import x509

from mailkms.mail._outbox import node_name
from mailkms.mail._templates import TemplateComposer
from mailkms.pki import PrivateKey
from mailkms.services import Composer, ReminderSweep, Services, TokenMailer


def _composer(services: Services) -> TemplateComposer:
    ca = services.ca

    def signer() -> tuple[x509.Certificate, PrivateKey, Sequence[x509.Certificate]]:
        s = ca.require_mail_signer()
        return s.certificate, s.private_key, list(ca.chain)

    return TemplateComposer(signer, services.settings.server.effective_mail_from, services.clock)


def reminder_sweep(services: Services, node: str | None = None) -> ReminderSweep:
    composer = _composer(services)
    return ReminderSweep(services.db, services.settings, services.clock, services.audit, composer, node or node_name())


def token_mailer(services: Services) -> TokenMailer:
    """Mails one-time tokens, signed by the server's mail key and sealed in the outbox."""

    def composer() -> Composer:
        return _composer(services)

    return TokenMailer(services.db, services.outbox_sealer, services.settings, services.clock, services.audit, composer)
