"""One-time tokens sent by mail from the console and the admin API (sealed in the outbox)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from mailkms.errors import MailkmsError
from mailkms.mail import token_mailer
from mailkms.services import Issued, Services, TokenMail, normalise_mailbox

log = logging.getLogger(__name__)


def mail_token_to(services: Services, email: str, name: str, token: str, actor: str) -> bool:
    """Queue a just-issued token as a signed mail to its user; False when it could not be queued.

    The user is already stored: a failure here must not hide the token, or nobody could hand it
    over and adding the user again would be refused (the page or answer shows it, mailed false)."""
    try:
        mailer = token_mailer(services)
        mailer.send([TokenMail(normalise_mailbox(email), name, token, mailer.expiry())], actor)
    except MailkmsError as exc:
        log.warning("the token for %s was not queued as a mail: %s", normalise_mailbox(email), exc.detail)
        return False
    return True


def tokens_by_mail(services: Services, actor: str) -> Callable[[Sequence[Issued]], None]:
    """An import's `on_added`: each batch's tokens queued as signed mails."""
    mailer = token_mailer(services)

    def send(issued: Sequence[Issued]) -> None:
        mailer.send([TokenMail(i.email, i.name, i.token, i.expires_at) for i in issued], actor)

    return send
