"""The `mailkms` command line."""

from mailkms.cli._main import app, main

__all__ = ["app", "main"]
