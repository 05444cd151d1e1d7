"""Mail in and out: the durable outbox worker and the embedded Maildir sink."""

from mailkms.mail._outbox import MailSender, OutboxWorker, SMTPSender, sender_for
from mailkms.mail._sink import MaildirHandler, MailSink, file_into_maildir, mailbox_dir

__all__ = [
    "MailSender",
    "MailSink",
    "MaildirHandler",
    "OutboxWorker",
    "SMTPSender",
    "file_into_maildir",
    "mailbox_dir",
    "sender_for",
]
