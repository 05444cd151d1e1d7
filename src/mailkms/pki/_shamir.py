"""Shamir secret sharing of the 16-byte KEK, by pycryptodome (GF(2^128)). Server only: the
client never imports this module (mailkms.pki does not re-export it)."""

from __future__ import annotations

from collections.abc import Sequence

from Crypto.Protocol.SecretSharing import Shamir

from mailkms.pki._recovery import KEK_BYTES, MAX_OFFICERS


def split_kek(kek: bytes | bytearray, threshold: int, count: int) -> list[tuple[int, bytearray]]:
    """N shares (index 1..N) of which any `threshold` give the KEK back (pycryptodome's Shamir)."""
    if len(kek) != KEK_BYTES:
        raise ValueError("the KEK has 16 bytes")
    if not 1 <= threshold <= count <= MAX_OFFICERS:
        raise ValueError(f"need 1 <= threshold <= officers <= {MAX_OFFICERS}")
    return [(index, bytearray(share)) for index, share in Shamir.split(threshold, count, bytes(kek))]


def combine_kek(shares: Sequence[tuple[int, bytes | bytearray]]) -> bytearray:
    """Lagrange interpolation at 0. With fewer than the threshold it returns a wrong value
    silently: the caller counts, and the AES-GCM tag of the wrapped key is the final judge."""
    return bytearray(Shamir.combine([(index, bytes(share)) for index, share in shares]))
