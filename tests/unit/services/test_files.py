"""The server's files (keys, certificates, CRLs, the checkpoint marker) are replaced whole: two
writers of one file (two nodes on a shared data folder) never leave a mixed or cut-off copy."""

from __future__ import annotations

import stat
import threading
from pathlib import Path

import pytest

from mailkms.services._files import write_atomically

SIZE = 512 * 1024


def test_two_writers_and_a_reader_only_ever_see_a_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "issuing.crl"
    write_atomically(target, b"a" * SIZE)
    contents = {b"a" * SIZE, b"b" * SIZE}
    seen_bad: list[int] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer(fill: bytes) -> None:
        try:
            for _ in range(60):
                write_atomically(target, fill * SIZE)
        except BaseException as exc:  # reported below: a writer must never fail
            errors.append(exc)

    def reader() -> None:
        while not stop.is_set():
            data = target.read_bytes()
            if data not in contents:
                seen_bad.append(len(data))

    threads = [threading.Thread(target=writer, args=(fill,)) for fill in (b"a", b"b")]
    watcher = threading.Thread(target=reader)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    watcher.join()
    assert not errors
    assert seen_bad == []
    assert target.read_bytes() in contents
    assert [p.name for p in tmp_path.iterdir()] == ["issuing.crl"]  # no temporary file left behind


def test_the_mode_is_set_before_a_byte_is_written(tmp_path: Path) -> None:
    key = tmp_path / "ca" / "issuing.key.pem"
    write_atomically(key, b"first secret bytes\n", 0o600)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    write_atomically(key, b"again\n", 0o600)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and key.read_bytes() == b"again\n"


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "root.crl"
    write_atomically(target, b"old")
    with pytest.raises(TypeError):
        write_atomically(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["root.crl"]
