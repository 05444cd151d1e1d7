"""The error tree: every refusal has its own stable code, an HTTP status and a non-zero exit code."""

from __future__ import annotations

import importlib
import pkgutil
import re

import pytest

import mailkms
import mailkms.errors as errors
from mailkms.errors import PROBLEM_BASE, MailkmsError


def all_subclasses(cls: type[MailkmsError]) -> list[type[MailkmsError]]:
    found: list[type[MailkmsError]] = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(all_subclasses(sub))
    return found


# Every module is imported first, so that errors defined outside mailkms.errors (the client
# has a few of its own) are checked too, whatever order the tests run in.
for _module in pkgutil.walk_packages(mailkms.__path__, "mailkms."):
    if not _module.name.endswith(".__main__"):  # `python -m` entry points run when imported
        importlib.import_module(_module.name)
ERRORS = all_subclasses(MailkmsError)


def test_the_tree_is_complete() -> None:
    names = {cls.__name__ for cls in ERRORS}
    assert {"BadCSR", "TokenUsed", "ReenrolmentRequired", "ReplayedNonce", "ServerUnreachable"} <= names
    assert len(ERRORS) >= 30


def test_codes_are_unique() -> None:
    codes = [cls.code for cls in ERRORS]
    duplicates = {code for code in codes if codes.count(code) > 1}
    assert not duplicates


@pytest.mark.parametrize("cls", ERRORS, ids=lambda c: c.__name__)
def test_each_error_has_its_own_code(cls: type[MailkmsError]) -> None:
    assert "code" in vars(cls), f"{cls.__name__} inherits its code from {cls.__mro__[1].__name__}"
    assert "title" in vars(cls)
    assert re.fullmatch(r"[a-z]+(-[a-z0-9]+)*", cls.code)
    assert cls.problem_type() == PROBLEM_BASE + cls.code


@pytest.mark.parametrize("cls", ERRORS, ids=lambda c: c.__name__)
def test_status_and_exit_code(cls: type[MailkmsError]) -> None:
    assert 400 <= cls.http_status <= 599
    assert cls.exit_code != 0
    assert 0 < cls.exit_code < 126  # shells reserve 126 and up


@pytest.mark.parametrize(
    ("family", "status"),
    [
        (errors.Malformed, 400),
        (errors.Unauthorized, 401),
        (errors.PolicyRefused, 403),
        (errors.NotFound, 404),
        (errors.Conflict, 409),
        (errors.Internal, 500),
    ],
)
def test_families_share_their_status(family: type[MailkmsError], status: int) -> None:
    # HTTP has more precise codes for two kinds of malformed request (RFC 9110 §15.5.14, §15.5.16).
    own_status = {
        "UnsupportedMediaType": 415,
        "BodyTooLarge": 413,
        "RequestTimeout": 408,
        "MethodNotAllowed": 405,
    }
    assert family.http_status == status
    for cls in all_subclasses(family):
        assert cls.http_status == own_status.get(cls.__name__, status), cls.__name__


@pytest.mark.parametrize(
    ("cls", "family"),
    [
        (errors.BadCSRSignature, errors.BadCSR),
        (errors.ReplayedNonce, errors.BadNonce),
        (errors.StaleNonce, errors.BadNonce),
        (errors.ReenrolmentRequired, errors.PolicyRefused),
        (errors.Revoked, errors.PolicyRefused),
        (errors.TokenUsed, errors.Unauthorized),
        (errors.TokenExpired, errors.Unauthorized),
        (errors.TokenWrongMailbox, errors.Unauthorized),
        (errors.TokenReplaced, errors.TokenInvalid),
        (errors.WrongPassphrase, errors.ClientStateError),
    ],
)
def test_refinements_stay_in_their_family(cls: type[MailkmsError], family: type[MailkmsError]) -> None:
    assert issubclass(cls, family)


def test_detail_defaults_to_the_title_and_keeps_extra_data() -> None:
    plain = errors.TokenUsed()
    assert plain.detail == errors.TokenUsed.title
    assert str(plain) == errors.TokenUsed.title
    specific = errors.ReplayedNonce("nonce abc was used at 12:00", nonce="abc")
    assert specific.detail == "nonce abc was used at 12:00"
    assert specific.extra == {"nonce": "abc"}
