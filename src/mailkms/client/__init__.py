"""The user's client. It stands on `mailkms.pki` only, so it runs where only the client is installed."""

from mailkms.client._cli import app, main
from mailkms.client._core import PROMPT, Client, LogonState, logon_state

__all__ = ["PROMPT", "Client", "LogonState", "app", "logon_state", "main"]
