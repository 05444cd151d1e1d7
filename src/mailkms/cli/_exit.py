"""The one mapping from mailkms errors to exit codes and messages on the admin command line.

0 ok; 1 internal; 2 malformed input; 3 not authorised; 4 not found; 5 conflict;
6 refused by policy; 75 CA key store (PKCS#11 token) unavailable, try again; 78 configuration error.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import typer

from mailkms.errors import MailkmsError


@contextmanager
def exit_on_error(as_json: bool = False) -> Iterator[None]:
    try:
        yield
    except MailkmsError as exc:
        if as_json:
            print(json.dumps({"error": exc.code, "type": exc.problem_type(), "detail": exc.detail}))
        else:
            print(f"mailkms: {exc.detail}", file=sys.stderr)
        raise typer.Exit(exc.exit_code) from None


def run(fn: Callable[[], None], as_json: bool = False) -> None:
    with exit_on_error(as_json):
        fn()
