"""Mail templates: one folder per message, plain text and HTML, values escaped in HTML."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailkms.mail import render
from mailkms.mail._templates import TEMPLATES

CONTEXT = {
    "name": "Eve <script>alert(1)</script>",
    "email": "eve@example.org",
    "expires": "15 July 2027",
    "expires_iso": "2027-07-15T09:29:59+00:00",
    "days_left": 30,
    "reminder_date": "15 January 2027",
    "server": "http://kms.example.org/",
    "mail_from": "mailkms@kms.example.org",
}


@pytest.mark.parametrize("name", sorted(p.name for p in TEMPLATES.iterdir() if p.is_dir()))
def test_every_template_folder_has_subject_text_and_html(name: str) -> None:
    folder = TEMPLATES / name
    assert {p.name for p in folder.iterdir()} >= {"subject.txt", "body.txt", "body.html"}


def test_values_are_escaped_in_html_only() -> None:
    rendered = render("reminder-due", CONTEXT)
    assert "Eve <script>" in rendered.text
    assert "<script>" not in rendered.html and "Eve &lt;script&gt;" in rendered.html
    assert rendered.subject == "Your security certificates expire on 15 July 2027: please renew them"
    assert "answer Yes" in rendered.text


def test_lists_render_as_lines_and_ul() -> None:
    ctx = {
        "since": "a",
        "now": "b",
        "due_count": 2,
        "renewed_count": 0,
        "expired_count": 1,
        "due_list": ["a@x.org", "b<@x.org"],
        "renewed_list": [],
        "expired_list": ["c@x.org"],
    }
    rendered = render("admin-summary", ctx)
    assert "  - a@x.org\n  - b<@x.org\n" in rendered.text and "(none)" in rendered.text
    assert "<li>b&lt;@x.org</li>" in rendered.html


def test_a_missing_value_fails_loudly(tmp_path: Path) -> None:
    with pytest.raises(KeyError):
        render("reminder-final", {"name": "x"})
    with pytest.raises(LookupError):
        render("no-such-template", CONTEXT)
