"""Tagged unions, nested in lists, dicts and optional fields, round-trip through a
``oneof`` (no service API carries one yet: the messages are generated here, from
structs of the test, by the same schema reader, renderer and converters)."""

from __future__ import annotations

import importlib
import subprocess
import sys
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imserver.rpc.convert import Decoder, Encoder, Fixes, Reads
from imserver.rpc.protogen import FieldLock, render_message
from imserver.rpc.schema import Field, Message, Registry

INT64 = st.integers(-(2**63), 2**63 - 1)


class Base(msgspec.Struct, tag_field="kind", kw_only=True):
    note: str | None = None


class Point(Base, tag="point", kw_only=True):
    x: int
    y: int = 0


class Label(Base, tag="label.text", kw_only=True):
    text: str
    parts: list[str] | None = None


class Group(Base, tag="group", kw_only=True):
    shapes: list[Point | Label]
    by_name: dict[str, Point | Label] = {}


class Drawing(msgspec.Struct, kw_only=True):
    shapes: list[Point | Label | Group]
    first: Point | Label | Group | None = None
    nested: dict[str, list[Point | Label]] = {}


@pytest.fixture(scope="module")
def compiled(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ModuleType, list[Message]]]:
    registry = Registry()
    top = Message("Top", [registry.field("value", "value", Drawing)])
    messages = [*registry.messages.values(), top]
    local = {m.name for m in messages}
    package = "rpctest"
    body = [render_message(m, package, FieldLock(), local) for m in messages]
    root = tmp_path_factory.mktemp("unions")
    (root / "rpctest").mkdir()
    (root / "rpctest" / "unions.proto").write_text(
        'syntax = "proto3";\n\npackage rpctest;\n\n' + "\n\n".join(body) + "\n"
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{root}",
            f"--python_out={root}",
            "rpctest/unions.proto",
        ],
        check=True,
    )
    sys.path.insert(0, str(root))
    try:
        yield importlib.import_module("rpctest.unions_pb2"), messages
    finally:
        sys.path.remove(str(root))


def _codec(compiled: tuple[ModuleType, list[Message]]) -> tuple[Encoder, Decoder]:
    module, messages = compiled
    by_name = {m.name: m for m in messages}
    top = by_name["Top"]
    return Encoder(module.Top, top, Fixes(by_name.__getitem__)), Decoder(
        top, Reads(by_name.__getitem__)
    )


def _round_trip(compiled: tuple[ModuleType, list[Message]], value: Drawing) -> Any:
    encoder, decoder = _codec(compiled)
    module = compiled[0]
    data = encoder.encode({"value": value}).SerializeToString()
    return msgspec.convert(decoder.read(module.Top.FromString(data))["value"], Drawing)


def test_the_union_is_a_oneof_named_by_the_tags(compiled: tuple[ModuleType, list[Message]]) -> None:
    module, _ = compiled
    oneofs = module.PointLabelGroupUnion.DESCRIPTOR.oneofs_by_name
    assert [f.name for f in oneofs["variant"].fields] == ["point", "label_text", "group"]


def test_nested_unions_none_and_empty_round_trip(
    compiled: tuple[ModuleType, list[Message]],
) -> None:
    drawing = Drawing(
        shapes=[
            Point(x=2**63 - 1, y=-(2**63)),
            Label(text="a\x00b", parts=[]),
            Label(text="", parts=None, note=""),
            Group(shapes=[], by_name={"p": Point(x=0), "l": Label(text="x")}),
            Group(shapes=[Point(x=1)]),
        ],
        first=None,
        nested={"": [], "b": [Label(text="t", parts=["u", ""])]},
    )
    back = _round_trip(compiled, drawing)
    assert back == drawing
    assert back.shapes[1].parts == [] and back.shapes[2].parts is None
    assert back.shapes[2].note == "" and back.shapes[0].note is None
    assert list(back.shapes[3].by_name) == ["p", "l"]
    assert _round_trip(compiled, Drawing(shapes=[], first=Group(shapes=[]))).first == Group(
        shapes=[]
    )


SHAPE = st.one_of(
    st.builds(Point, x=INT64, y=INT64, note=st.none() | st.text()),
    st.builds(Label, text=st.text(), parts=st.none() | st.lists(st.text(), max_size=3)),
)


@settings(max_examples=60, deadline=None)
@given(
    shapes=st.lists(
        SHAPE
        | st.builds(
            Group,
            shapes=st.lists(SHAPE, max_size=3),
            by_name=st.dictionaries(st.text(), SHAPE, max_size=2),
        ),
        max_size=4,
    ),
    first=st.none() | SHAPE,
    nested=st.dictionaries(st.text(), st.lists(SHAPE, max_size=2), max_size=2),
)
def test_any_drawing_round_trips(
    compiled: tuple[ModuleType, list[Message]],
    shapes: list[Any],
    first: Any,
    nested: dict[str, Any],
) -> None:
    drawing = Drawing(shapes=shapes, first=first, nested=nested)
    assert _round_trip(compiled, drawing) == drawing


def test_two_unions_of_one_base_are_two_messages() -> None:
    registry = Registry()
    field = registry.field("value", "value", Drawing)
    assert isinstance(field, Field)
    unions = {n: m.oneof for n, m in registry.messages.items() if m.oneof is not None}
    assert {n: [v[0] for v in u.variants] for n, u in unions.items() if u} == {
        "PointLabelGroupUnion": ["point", "label_text", "group"],
        "PointLabelUnion": ["point", "label_text"],
    }
