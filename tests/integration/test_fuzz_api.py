"""Issue 12 item 5: the HTTP API fuzzed in process (ASGI), from its OpenAPI with schemathesis, and the
routes the OpenAPI does not describe (OCSP, odd paths, methods and media types under EST and CRL)
with hand-written hypothesis strategies. On every answer: no 5xx, no traceback or internal text,
and every refusal a problem document, except EST's documented text/plain refusals."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from mailkms.api import create_app, create_http_app
from mailkms.clock import FakeClock
from mailkms.services import Services
from tests.conftest import CA_PASSPHRASE, PUBLIC_URL, START

EXAMPLES = 100  # per operation; the whole module stays well under two minutes on two shared cores
INTERNAL_TEXT = ("Traceback", 'File "', "site-packages", "/work/", "/tmp/", "Error(", "<object", "sqlalchemy")
EST = "/.well-known/est/"
# EST bodies are base64 text of DER (RFC 8951): sent as text, as the documented schema says.
schemathesis.serializer.alias(["application/pkcs10", "application/pkcs7-mime"], "text/plain")
schemathesis.serializer.alias(["application/pkixcmp"], "application/octet-stream")  # CMP: DER bodies


@pytest.fixture(scope="module")
def fuzz_services(ca_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    """One server for the module, on SQLite, with a user enrolled, a CRL published, and no rate
    limit (the fuzzer is one client; 429s would hide the paths behind them)."""
    from mailkms.config import load_settings

    data = tmp_path_factory.mktemp("fuzz") / "data"
    shutil.copytree(ca_template, data)
    cfg = load_settings(
        data,
        database_url=f"sqlite:///{data / 'fuzz.db'}",
        ca_passphrase=CA_PASSPHRASE,
        server={"hostname": "localhost", "public_url": PUBLIC_URL},
        limits={"rate_per_minute": 0},
    )
    services = Services.build(cfg, FakeClock(START))
    services.users.add("alice@example.org", "Alice", None, "admin:test")
    services.revocation.publish_crl()
    services.revocation.refresh_latest()
    yield services
    services.close()


def check_answer(method: str, path: str, status: int, headers: Any, body: bytes) -> None:
    """The checks every answer must pass, whatever was asked."""
    text = body.decode("latin-1")
    assert status < 500, f"{method} {path} -> {status}: {text[:300]}"
    for leak in INTERNAL_TEXT:
        if leak in path:  # the client's own input echoed back (e.g. "'sqlalchemy' is not a valid e-mail address")
            continue
        assert leak not in text, f"{method} {path} -> {status} shows {leak!r}: {text[:300]}"
    if not 400 <= status < 500:
        return
    media = headers.get("content-type", "")
    media = media[0] if isinstance(media, list) else media  # schemathesis keeps header values in lists
    if path.startswith(EST) and media.startswith("text/plain"):
        assert "urn:mailkms:problem:" in text, f"EST refusal without its problem type: {text[:200]}"
        return
    if path == "/ocsp" or path.startswith("/ocsp/"):
        assert status in (405, 413), f"{method} {path} -> {status}"  # OCSP answers errors in OCSP itself
        return
    assert media == "application/problem+json", f"{method} {path} -> {status} as {media}: {text[:200]}"
    if method == "HEAD":
        return  # the headers of the problem document, no body
    problem = json.loads(body)
    assert {"type", "title", "status", "detail"} <= set(problem), problem
    assert problem["status"] == status and problem["type"].startswith("urn:mailkms:problem:")


# --- from the OpenAPI -------------------------------------------------------------------------------------------
def fuzz_operations(
    operations: list[Any], mode: GenerationMode, *, examples: int = EXAMPLES, headers: dict[str, str] | None = None
) -> list[tuple[str, int]]:
    """Every operation fuzzed, `examples` cases each, each answer checked; (operation, status) per call."""
    calls: list[tuple[str, int]] = []
    for operation in operations:

        @settings(
            max_examples=examples,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def fuzz(case: Any) -> None:
            response = case.call(headers=headers)
            calls.append((case.operation.label, response.status_code))
            check_answer(
                case.method.upper(), case.formatted_path, response.status_code, response.headers, response.content
            )

        try:
            fuzz()
        except Unsatisfiable:
            # An operation with nothing to break (no parameters, no body) has no negative cases.
            assert mode is GenerationMode.NEGATIVE, operation.label
    return calls


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_the_openapi_fuzzed(fuzz_services: Services, mode: GenerationMode) -> None:
    """Every operation in /openapi.json, EXAMPLES cases each: schema-valid ones, then ones that break it."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(fuzz_services))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15, [op.label for op in operations]
    started = time.monotonic()
    calls: dict[str, int] = {}
    for label, _status in fuzz_operations(operations, mode):
        calls[label] = calls.get(label, 0) + 1
    print(
        f"schemathesis {mode.value}: {sum(calls.values())} calls on {len(calls)} operations in {time.monotonic() - started:.1f} s"
    )
    if mode is GenerationMode.POSITIVE:
        assert len(calls) == len({op.label for op in operations}), "an operation was never called"
    else:
        assert len(calls) >= 8, calls


# --- what the OpenAPI does not say: OCSP, CRL, EST and CMP by hand ----------------------------------------------------
_PATHS = st.sampled_from(
    [
        "/ocsp",
        "/ocsp/",
        "/crl/issuing.crl",
        "/crl/root.crl",
        "/ca/root.crt",
        EST + "cacerts",
        EST + "csrattrs",
        EST + "simpleenroll",
        EST + "simplereenroll",
        EST + "serverkeygen",
        EST + "nothing",
        "/.well-known/est",
        "/.well-known/cmp",
        "/.well-known/cmp/p/smime",
    ]
) | st.builds(lambda tail: "/ocsp/" + tail, st.text(alphabet="ABCDEFabcdef0123456789+/=%", max_size=80))
_MEDIA = st.sampled_from(
    [
        "application/pkcs10",
        "application/pkcs7-mime",
        "application/pkcs7-mime; smime-type=CMC-request",
        "application/ocsp-request",
        "application/pkixcmp",
        "application/json",
        "text/plain",
        "",
        "multipart/form-data; boundary=x",
    ]
)
_BODIES = st.one_of(
    st.binary(max_size=2048),
    st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\r\n ", max_size=2048).map(
        str.encode
    ),
    st.just(b"MIIB" * 100),
)
_AUTH = st.one_of(
    st.none(),
    st.tuples(st.sampled_from(["alice@example.org", "x", "", "a@b"]), st.text(max_size=30)),
    st.text(max_size=40).map(lambda raw: raw),  # a raw Authorization header
)


@pytest.mark.parametrize("surface", ["https", "http"])
def test_est_ocsp_and_crl_fuzzed_by_hand(fuzz_services: Services, surface: str) -> None:
    app = create_app(fuzz_services) if surface == "https" else create_http_app(fuzz_services)
    client = TestClient(app, raise_server_exceptions=False)

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
    @given(
        method=st.sampled_from(["GET", "POST", "HEAD", "PUT", "DELETE"]),
        path=_PATHS,
        media=_MEDIA,
        body=_BODIES,
        auth=_AUTH,
        query=st.sampled_from(["", "?format=pem", "?format=" + "x" * 50]),
    )
    def fuzz(method: str, path: str, media: str, body: bytes, auth: Any, query: str) -> None:
        headers = {"Content-Type": media} if media else {}
        kwargs: dict[str, Any] = {}
        if isinstance(auth, tuple):
            kwargs["auth"] = auth
        elif isinstance(auth, str) and auth.isascii() and auth.isprintable():
            headers["Authorization"] = auth
        if method in ("POST", "PUT"):
            kwargs["content"] = body
        response = client.request(method, path + query, headers=headers, **kwargs)
        check_answer(method, path, response.status_code, response.headers, response.content)

    fuzz()
