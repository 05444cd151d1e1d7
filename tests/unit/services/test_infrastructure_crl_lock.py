"""Two server processes on one data folder re-sign the infrastructure CA's CRL at the same moments
(a new TLS certificate each, or the daily check): the read-number-sign-write runs under a file lock,
so no CRL number is ever signed twice and the file ends with the highest one."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
from pathlib import Path

from cryptography import x509

from mailkms.pki import PublicURLs, crl_number
from tests.conftest import CA_PASSPHRASE, PUBLIC_URL

ROUNDS = 25


def _resign(data_dir: str, start) -> list[int]:  # type: ignore[no-untyped-def]
    from mailkms.clock import SystemClock
    from mailkms.services import CAContext, CAPaths

    ctx = CAContext.load(CAPaths(Path(data_dir)), passphrase_env=CA_PASSPHRASE, urls=PublicURLs(PUBLIC_URL))
    numbers = []
    start.wait(60)  # both loaded: from here they race
    for _ in range(ROUNDS):
        ctx._ensure_infrastructure_crl(SystemClock().now(), [], force=True)
        assert ctx.infrastructure_crl is not None
        numbers.append(crl_number(ctx.infrastructure_crl))
    return numbers


def test_two_processes_never_sign_one_infrastructure_crl_number_twice(data_dir: Path) -> None:
    path = data_dir / "crl" / "infrastructure.crl"
    assert path.exists(), "the CA template has an infrastructure CA and its CRL"
    first = crl_number(x509.load_der_x509_crl(path.read_bytes()))
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, concurrent.futures.ProcessPoolExecutor(2, mp_context=context) as pool:
        start = manager.Barrier(2)
        runs = [pool.submit(_resign, str(data_dir), start) for _ in range(2)]
        numbers = [n for run in runs for n in run.result(timeout=120)]
    assert len(numbers) == 2 * ROUNDS
    assert len(set(numbers)) == len(numbers), sorted(numbers)  # every number signed once
    assert sorted(numbers) == list(range(first + 1, first + 1 + 2 * ROUNDS))
    assert crl_number(x509.load_der_x509_crl(path.read_bytes())) == first + 2 * ROUNDS
