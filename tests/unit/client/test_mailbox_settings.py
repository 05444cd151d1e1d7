"""The IMAP mailbox settings: URLs, certificate pins, and the password sealed with the passphrase."""

from __future__ import annotations

import json

import pytest

from mailkms.client._mailbox import ImapSettings, ImapURL, normalise_pin, parse_imap_url
from mailkms.client._store import ClientState, open_secret, seal_secret
from mailkms.errors import BadMailboxURL, ClientStateError, Malformed, WrongPassphrase

FAST = 1_000  # iterations: the format, not the cost, is under test here


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("imaps://alice@mail.example.org/INBOX", ImapURL("imaps", "alice", "mail.example.org", 993, "INBOX")),
        ("imaps://alice@mail.example.org", ImapURL("imaps", "alice", "mail.example.org", 993, "INBOX")),
        ("imaps://alice@mail.example.org/", ImapURL("imaps", "alice", "mail.example.org", 993, "INBOX")),
        ("imap://alice@mail.example.org/INBOX", ImapURL("imap", "alice", "mail.example.org", 143, "INBOX")),
        (
            "IMAPS://bob@Mail.Example.org:10993/Lists/mailkms",
            ImapURL("imaps", "bob", "mail.example.org", 10993, "Lists/mailkms"),
        ),
        (
            "imap://alice%40example.org@127.0.0.1:1143/INBOX",
            ImapURL("imap", "alice@example.org", "127.0.0.1", 1143, "INBOX"),
        ),
        ("imaps://a%20b@[::1]:993/My%20Certs", ImapURL("imaps", "a b", "::1", 993, "My Certs")),
    ],
)
def test_urls_parse(text: str, expected: ImapURL) -> None:
    assert parse_imap_url(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "http://alice@mail.example.org/INBOX",
        "pop3s://alice@mail.example.org/",
        "mail.example.org",
        "imaps://mail.example.org/INBOX",  # no user
        "imaps://alice@/INBOX",  # no host
        "imaps://alice:secret@mail.example.org/INBOX",  # a password in the URL
        "imaps://alice@mail.example.org:99999/INBOX",
        "imaps://alice@mail.example.org/INBOX;UIDVALIDITY=3",
        "imaps://alice@mail.example.org/INBOX?x=1",
        "imaps://alice@mail.example.org/Entw%C3%BCrfe",  # non-ASCII folder: not supported
    ],
)
def test_bad_urls_refused(text: str) -> None:
    with pytest.raises(BadMailboxURL) as raised:
        parse_imap_url(text)
    assert raised.value.exit_code == 2
    if "secret" in text:
        assert "secret" not in raised.value.detail


def test_url_round_trips_as_stored() -> None:
    url = parse_imap_url("imap://alice%40example.org@localhost/Some%20Folder")
    assert str(url) == "imap://alice%40example.org@localhost:143/Some%20Folder"
    assert parse_imap_url(str(url)) == url


def test_pins() -> None:
    hexa = "ab" * 32
    for text in (f"sha256:{hexa}", f"SHA256:{':'.join(['AB'] * 32)}", hexa.upper(), f"sha256={hexa}"):
        assert normalise_pin(text) == f"sha256:{hexa}"
    for bad in ("sha256:abcd", "md5:" + hexa, "zz" * 32):
        with pytest.raises(Malformed):
            normalise_pin(bad)


def test_done_folder_must_differ_from_the_folder_read() -> None:
    with pytest.raises(BadMailboxURL):
        ImapSettings(parse_imap_url("imaps://a@h/mailkms"), "pw", done_folder="mailkms")


def test_password_sealed_and_opened() -> None:
    sealed = seal_secret("correct horse", b"the passphrase", "mailkms imap password", iterations=FAST)
    assert "correct horse" not in json.dumps(sealed)
    assert open_secret(sealed, b"the passphrase", "mailkms imap password") == "correct horse"
    again = seal_secret("correct horse", b"the passphrase", "mailkms imap password", iterations=FAST)
    assert again["ciphertext"] != sealed["ciphertext"], "a fresh salt and nonce each time"


def test_wrong_passphrase_and_tampering_refused() -> None:
    sealed = seal_secret("correct horse", b"the passphrase", "mailkms imap password", iterations=FAST)
    with pytest.raises(WrongPassphrase):
        open_secret(sealed, b"another passphrase", "mailkms imap password")
    with pytest.raises(WrongPassphrase):
        open_secret(sealed, b"the passphrase", "another purpose")
    flipped = dict(sealed)
    flipped["ciphertext"] = ("B" if sealed["ciphertext"][0] != "B" else "C") + str(sealed["ciphertext"])[1:]
    with pytest.raises(WrongPassphrase):
        open_secret(flipped, b"the passphrase", "mailkms imap password")
    with pytest.raises(ClientStateError):
        open_secret({"alg": "rot13"}, b"the passphrase", "mailkms imap password")


def test_account_in_state_json_keeps_no_password_and_old_states_load() -> None:
    settings = ImapSettings(parse_imap_url("imaps://alice@localhost/INBOX"), "hunter2-imap", pin="cd" * 32)
    account = settings.sealed(b"the passphrase")
    state = ClientState("https://kms", "alice@example.org", "FP", "PEM", "kms@example.org", "", imap=account)
    text = state.to_json()
    assert "hunter2-imap" not in text
    loaded = ClientState.from_json(text)
    assert loaded.imap == account
    assert ImapSettings.unsealed(loaded.imap, b"the passphrase") == settings
    # a state file written before IMAP existed
    old = json.loads(text)
    del old["imap"]
    assert ClientState.from_json(json.dumps(old)).imap is None
