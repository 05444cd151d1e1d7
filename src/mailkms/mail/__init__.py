"""Mail in and out: the durable outbox worker and the embedded Maildir sink."""

from mailkms.mail._outbox import MailSender, OutboxWorker, SMTPSender, sender_for
from mailkms.mail._reminders import reminder_sweep
from mailkms.mail._sink import MaildirHandler, MailSink, file_into_maildir, mailbox_dir
from mailkms.mail._templates import TemplateComposer, render, signed_alternative

__all__ = [
    "MailSender",
    "MailSink",
    "MaildirHandler",
    "OutboxWorker",
    "SMTPSender",
    "TemplateComposer",
    "file_into_maildir",
    "mailbox_dir",
    "reminder_sweep",
    "render",
    "sender_for",
    "signed_alternative",
]
