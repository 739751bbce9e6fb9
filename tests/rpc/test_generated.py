"""The committed .proto files and generated code are what the Protocols generate
today, and field numbers never move."""

from __future__ import annotations

import filecmp
from pathlib import Path

import pytest

from imserver.rpc import protogen
from imserver.rpc.protogen import LOCK, RPC_DIR, FieldLock


def test_the_committed_protos_and_generated_code_are_current(tmp_path: Path) -> None:
    protogen.main(["--out", str(tmp_path)])
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    committed = sorted(
        p.relative_to(RPC_DIR)
        for p in RPC_DIR.rglob("*")
        if p.is_file()
        and (p.suffix in (".proto",) or p.name == LOCK or p.parent.name == "generated")
        and "__pycache__" not in p.parts
    )
    assert fresh == committed, "run scripts/gen-rpc and commit the result"
    stale = [str(p) for p in fresh if not filecmp.cmp(tmp_path / p, RPC_DIR / p, shallow=False)]
    assert stale == [], "run scripts/gen-rpc and commit the result"


def test_a_locked_field_keeps_its_number_and_a_new_one_takes_the_next() -> None:
    lock = FieldLock("p.M.a = 1 string\np.M.c = 3 int64\n")
    assert lock.number("p.M", "c", "int64") == 3
    assert lock.number("p.M", "b", "bool") == 4
    assert lock.number("p.M", "a", "string") == 1
    assert lock.number("p.Other", "x", "bytes") == 1


def test_a_removed_field_is_reserved_and_its_line_kept() -> None:
    lock = FieldLock("p.M.a = 1 string\np.M.gone = 2 int64\n")
    assert lock.retired("p.M", {"a"}) == [("gone", 2)]
    assert "p.M.gone = 2 int64" in lock.text()
    assert lock.number("p.M", "new", "string") == 3


def test_a_field_that_changes_type_is_refused() -> None:
    lock = FieldLock("p.M.a = 1 string\n")
    with pytest.raises(ValueError, match=r"p\.M\.a was string and is now int64"):
        lock.number("p.M", "a", "int64")


def test_the_lock_numbers_every_field_of_the_committed_protos() -> None:
    lock = FieldLock((RPC_DIR / LOCK).read_text())
    text = "\n".join(p.read_text() for p in sorted(RPC_DIR.glob("*.proto")))
    for key, (number, _) in lock.entries.items():
        name = key.rsplit(".", 1)[1]
        assert f" {name} = {number};" in text or f'reserved "{name}"' in text, key
