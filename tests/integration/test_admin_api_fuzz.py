"""The admin API fuzzed from its OpenAPI (schemathesis) with a real operator's token, so the cases get
past authentication: no 5xx, no internal text, every refusal a problem document; the audit chain
still verifies after whatever the fuzzer added and revoked."""

from __future__ import annotations

import time

import pytest
import schemathesis
from schemathesis import GenerationMode

from mailkms.api import create_app
from mailkms.services import Role, Services
from tests.integration.test_fuzz_api import fuzz_operations, fuzz_services  # noqa: F401 - the fixture

EXAMPLES = 40


@pytest.fixture(scope="module")
def operator_token(fuzz_services: Services) -> str:  # noqa: F811 - the imported fixture
    fuzz_services.admins.add("olga", Role.OPERATOR, "a long enough password", "admin:test")
    return fuzz_services.admins.new_api_token("olga", "admin:test")


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_admin_api_fuzzed_with_a_token(
    fuzz_services: Services,  # noqa: F811 - the imported fixture
    operator_token: str,
    mode: GenerationMode,
) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(fuzz_services))
    operations = [r.ok() for r in schema.get_all_operations() if r.ok().path.startswith("/api/v1/admin")]
    assert len(operations) >= 8, [op.label for op in operations]
    started = time.monotonic()
    statuses: dict[int, int] = {}
    headers = {"Authorization": f"Bearer {operator_token}"}
    for _label, status in fuzz_operations(operations, mode, examples=EXAMPLES, headers=headers):
        statuses[status] = statuses.get(status, 0) + 1
    print(f"admin API {mode.value}: {statuses} in {time.monotonic() - started:.1f} s")
    assert statuses.get(401, 0) < sum(statuses.values()), "the token never got through"
    if mode is GenerationMode.POSITIVE:
        assert statuses.get(200, 0) + statuses.get(201, 0) > 0
    assert fuzz_services.verify_audit().ok
