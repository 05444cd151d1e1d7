"""One-time tokens sent by mail from the console and the admin API (sealed in the outbox)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from mailkms.mail import token_mailer
from mailkms.services import Issued, Services, TokenMail, normalise_mailbox


def mail_token_to(services: Services, email: str, name: str, token: str, actor: str) -> None:
    """Queue a just-issued token as a signed mail to its user."""
    mailer = token_mailer(services)
    mailer.send([TokenMail(normalise_mailbox(email), name, token, mailer.expiry())], actor)


def tokens_by_mail(services: Services, actor: str) -> Callable[[Sequence[Issued]], None]:
    """An import's `on_added`: each batch's tokens queued as signed mails."""
    mailer = token_mailer(services)

    def send(issued: Sequence[Issued]) -> None:
        mailer.send([TokenMail(i.email, i.name, i.token, i.expires_at) for i in issued], actor)

    return send
