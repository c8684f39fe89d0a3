"""The contracts package: one definition per idea, and the tables that derive from it."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper
from pydantic import ValidationError

from contracts import oip
from contracts.bounded import MAX_DOCUMENT_BYTES, check_json_document, check_text
from contracts.errors import PayloadError
from contracts.ids import (
    BUNDLE_LABEL,
    DEVICE_ID,
    MESSAGE_ID,
    NAME,
    TAG,
    VERSION,
    IdentifierKind,
    check_device_id,
)
from contracts.mqtt import Status, TelemetryBatch, TelemetryRecord, decode_payload
from contracts.tensors import (
    ELEMENT_TYPES,
    dtype_of_oip_datatype,
    dtype_of_onnxruntime_type,
    oip_datatype_of,
)
from fleet.config import FleetSettings
from fleet.models import TelemetryRecordRow
from fleet.telemetry import COLUMN_OF_FIELD

_ONNX_TYPES = {
    "bool": TensorProto.BOOL,
    "uint8": TensorProto.UINT8,
    "uint16": TensorProto.UINT16,
    "uint32": TensorProto.UINT32,
    "uint64": TensorProto.UINT64,
    "int8": TensorProto.INT8,
    "int16": TensorProto.INT16,
    "int32": TensorProto.INT32,
    "int64": TensorProto.INT64,
    "float16": TensorProto.FLOAT16,
    "float32": TensorProto.FLOAT,
    "float64": TensorProto.DOUBLE,
}


def test_every_telemetry_field_has_a_column_and_every_column_a_source() -> None:
    columns = set(TelemetryRecordRow.__table__.columns.keys())  # type: ignore[attr-defined]
    fields = {COLUMN_OF_FIELD.get(name, name) for name in TelemetryRecord.model_fields}
    assert fields <= columns, f"message fields without a column: {sorted(fields - columns)}"
    assert columns - fields == {"device_id", "received_at"}, "columns nothing fills"


@pytest.mark.parametrize("numpy_name", [t.numpy for t in ELEMENT_TYPES])
def test_each_element_type_is_what_onnxruntime_reports_for_it(
    numpy_name: str,
) -> None:
    """The table's ONNX Runtime names are ONNX Runtime's own, read off a real session."""
    node = helper.make_node("Identity", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "identity",
        [helper.make_tensor_value_info("x", _ONNX_TYPES[numpy_name], [2])],
        [helper.make_tensor_value_info("y", _ONNX_TYPES[numpy_name], [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    reported = session.get_inputs()[0].type
    assert dtype_of_onnxruntime_type(reported) == numpy_name
    datatype = oip_datatype_of(numpy_name)
    assert dtype_of_oip_datatype(datatype) == np.dtype(numpy_name)
    assert oip.DATATYPES[datatype] == np.dtype(numpy_name)
    result = session.run(None, {"x": np.zeros(2, numpy_name)})[0]
    assert oip.encode_output("y", result).datatype == datatype


def test_types_outside_the_table_are_refused_by_name() -> None:
    assert dtype_of_onnxruntime_type("tensor(string)") is None
    with pytest.raises(ValueError, match="no Open Inference Protocol datatype"):
        oip_datatype_of(np.dtype("complex64"))


def test_fleet_settings_refuse_unknown_keys() -> None:
    with pytest.raises(ValidationError, match="mqtt_prot"):
        FleetSettings.model_validate({"mqtt_prot": 1883})


# --- the identifier policy and bounded values ------------------------------------------------

_KINDS = [DEVICE_ID, NAME, TAG, VERSION, BUNDLE_LABEL, MESSAGE_ID]


@pytest.mark.parametrize("kind", _KINDS, ids=lambda k: k.what)
@pytest.mark.parametrize(
    "bad", ["zz\n", "\nzz", "z z", "z/z", "z#", "z+", "$share", "-z", ".z", "", "z\x00", "zé"]
)
def test_no_identifier_takes_a_character_outside_its_alphabet(
    kind: IdentifierKind, bad: str
) -> None:
    if (kind is VERSION or kind is BUNDLE_LABEL) and bad == "z+":
        assert kind.check(bad) == bad  # '+' is part of semantic versions' build metadata
        return
    with pytest.raises(ValueError, match=f"{kind.what} .* is not valid"):
        kind.check(bad)


@pytest.mark.parametrize("kind", _KINDS, ids=lambda k: k.what)
def test_identifiers_are_bounded_in_length(kind: IdentifierKind) -> None:
    assert kind.check("a" * kind.max_length)
    with pytest.raises(ValueError, match=f"1 to {kind.max_length}"):
        kind.check("a" * (kind.max_length + 1))


@given(st.text(max_size=80))
def test_an_accepted_identifier_is_safe_in_a_topic_and_a_config_line(value: str) -> None:
    try:
        check_device_id(value)
    except ValueError:
        return
    assert value.isascii() and value.isprintable()
    assert not set(value) & set("/+#$ \t\r\n\x00")


def test_every_mqtt_message_field_is_bounded() -> None:
    """Values past the database's range or JSON's are refused by the contract itself."""
    good = {"id": "r1", "ts": 1.7e9, "inferences": 3, "errors": 1}
    assert TelemetryRecord.model_validate(good).errors == 1
    for field, value in [
        ("ts", float("nan")),
        ("ts", 1e20),
        ("inferences", 2**63),
        ("inferences", -1),
        ("latency_p95_ms", float("inf")),
        ("errors", 4),  # more errors than inferences
        ("bundle", "digits-1.0.0\n"),
        ("extra", {"a": float("nan")}),
        ("extra", {"a": "\x00"}),
        ("extra", {"deep": [[[[[[[[[1]]]]]]]]]}),
        ("extra", {"big": "x" * (MAX_DOCUMENT_BYTES + 1)}),
    ]:
        with pytest.raises(ValidationError, match=field):
            TelemetryRecord.model_validate({**good, field: value})
    with pytest.raises(ValidationError, match="bundle_version_number"):
        Status.model_validate({"online": True, "bundle_version_number": 2**64})
    with pytest.raises(PayloadError, match=r"records\.0\.ts: Input should be a finite number"):
        decode_payload(b'{"records": [{"id": "r", "ts": NaN}]}', TelemetryBatch)


def test_text_refuses_control_characters_but_keeps_newlines_and_tabs() -> None:
    assert check_text("line one\n\tline two", max_length=100) == "line one\n\tline two"
    for bad in ("\x00", "\x1b[31m", "\x7f"):
        with pytest.raises(ValueError, match="control character"):
            check_text(f"a{bad}b", max_length=100)
    with pytest.raises(ValueError, match="over the 3 allowed"):
        check_text("abcd", max_length=3)


def test_json_documents_are_shallow_small_and_finite() -> None:
    assert check_json_document({"a": [1, 2.5, "x", None, True, {"b": 2**62}]})
    with pytest.raises(ValueError, match="outside 64 bits"):
        check_json_document({"a": 2**64})
    with pytest.raises(ValueError, match="not text"):
        check_json_document({1: "a"})
    nested: dict[str, object] = {}
    node = nested
    for _ in range(20):
        node["n"] = {}
        node = node["n"]  # type: ignore[assignment]
    with pytest.raises(ValueError, match="nested over 8 levels"):
        check_json_document(nested)


def test_a_json_document_is_bounded_in_bytes_as_stored_however_small_its_parts() -> None:
    at_limit = {"a": "é" * ((100 - len('{"a":""}')) // 2)}  # 100 bytes as compact UTF-8
    assert check_json_document(at_limit, max_bytes=100) == at_limit
    over = {"a": "é" * 47}  # 47 characters, 102 bytes: only the byte count refuses it
    with pytest.raises(ValueError, match="102 bytes of JSON, over the 100 allowed"):
        check_json_document(over, max_bytes=100)
    many = {"k": ["x" * 100] * 3000}  # every string short, the whole over 256 KiB
    with pytest.raises(ValueError, match="bytes of JSON, over the 262144 allowed"):
        check_json_document(many)


def test_wait_for_stop_ends_on_a_signal_even_when_sigint_was_ignored() -> None:
    """A background shell job starts with SIGINT ignored; Ctrl-C must still stop the wait,
    and the handler that was there before is put back."""
    import os
    import signal
    import threading

    from contracts.cli import wait_for_stop

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
        assert wait_for_stop(30) is True
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert wait_for_stop(0.3) is False
    finally:
        signal.signal(signal.SIGINT, previous)
