"""MIME entities mailkms makes itself, written straight to CRLF bytes.

Only for entities whose every header mailkms writes (ASCII, no user text) and whose bodies are
base64: the delivery mail. The `email` package writes the same entities at about ten times the
cost (it parses each header it was just given again before folding it; 1.5 ms of a renewal's
delivery went there). Reading mail stays with the `email` package; tests/unit/pki/test_mime.py
parses what this writes with it and compares every header and body with the `email` package's
own rendering of the same message.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Sequence

FOLD_AT = 78  # RFC 5322 §2.1.1: SHOULD be no more than 78 characters


def header(name: str, value: str, *params: tuple[str, str]) -> bytes:
    """`Name: value; p="v"; ...` with CRLF; parameters folded onto lines of their own when the line
    would pass 78 characters (RFC 2045 §5.1 allows whitespace around the ';')."""
    text = name + value + "".join(k + v for k, v in params)
    if not text.isascii() or "\r" in text or "\n" in text or any('"' in v for _, v in params):
        raise ValueError("mailkms's own headers are ASCII, without line breaks or quotes in parameters")
    pieces = [f"{name}: {value}", *(f'{k}="{v}"' for k, v in params)]
    line = "; ".join(pieces)
    if len(line) > FOLD_AT:
        line = ";\r\n ".join(pieces)
    return line.encode() + b"\r\n"


def base64_body(data: bytes) -> bytes:
    """76-character lines (RFC 2045 §6.8), each ended by CRLF."""
    return base64.encodebytes(data).replace(b"\n", b"\r\n")


def entity(headers: Sequence[bytes], body: bytes) -> bytes:
    return b"".join(headers) + b"\r\n" + body


def base64_attachment_headers(content_type: str, filename: str, smime_type: str | None = None) -> bytes:
    """The headers `email.mime.application.MIMEApplication` plus a Content-Disposition give."""
    params = [("name", filename)] + ([("smime-type", smime_type)] if smime_type else [])
    return b"".join(
        [
            header("Content-Type", content_type, *params),
            b"MIME-Version: 1.0\r\n",
            b"Content-Transfer-Encoding: base64\r\n",
            header("Content-Disposition", "attachment", ("filename", filename)),
        ]
    )


def base64_attachment(data: bytes, content_type: str, filename: str, smime_type: str | None = None) -> bytes:
    return entity([base64_attachment_headers(content_type, filename, smime_type)], base64_body(data))


def utf8_text(text: str, subtype: str = "plain") -> bytes:
    """text/* in UTF-8, base64 (as `MIMEText(text, subtype, "utf-8")`)."""
    return entity(
        [
            header("Content-Type", f"text/{subtype}", ("charset", "utf-8")),
            b"MIME-Version: 1.0\r\n",
            b"Content-Transfer-Encoding: base64\r\n",
        ],
        base64_body(text.encode()),
    )


def new_boundary() -> str:
    # The `email` package's form. Every part here is base64, whose alphabet has no '-', so no body
    # line can start with "--" and the boundary cannot occur inside a part.
    return "=" * 15 + f"{secrets.randbits(63):019d}" + "=="


def multipart(subtype: str, parts: Sequence[bytes], boundary: str | None = None) -> bytes:
    mark = (boundary or new_boundary()).encode()
    out = [
        header("Content-Type", f"multipart/{subtype}", ("boundary", mark.decode())),
        b"MIME-Version: 1.0\r\n",
        b"\r\n",
    ]
    for part in parts:
        out += [b"--", mark, b"\r\n", part, b"\r\n"]
    out += [b"--", mark, b"--\r\n"]
    return b"".join(out)
