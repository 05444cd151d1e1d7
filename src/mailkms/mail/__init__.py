"""Mail in and out: the durable outbox worker and the embedded Maildir sink."""

from mailkms.mail._outbox import (
    FAILURE_KINDS,
    FailureKind,
    MailSender,
    OutboxWorker,
    SendFailure,
    SMTPSender,
    classify,
    relay_tls_context,
    sender_for,
)
from mailkms.mail._reminders import reminder_sweep, token_mailer
from mailkms.mail._sink import MaildirHandler, MailSink, file_into_maildir, mailbox_dir
from mailkms.mail._templates import TemplateComposer, render, signed_alternative

__all__ = [
    "FAILURE_KINDS",
    "FailureKind",
    "MailSender",
    "MailSink",
    "MaildirHandler",
    "OutboxWorker",
    "SMTPSender",
    "SendFailure",
    "TemplateComposer",
    "classify",
    "file_into_maildir",
    "mailbox_dir",
    "relay_tls_context",
    "reminder_sweep",
    "render",
    "sender_for",
    "signed_alternative",
    "token_mailer",
]
