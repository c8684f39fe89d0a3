"""The contracts package: one definition per idea, and the tables that derive from it."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from pydantic import ValidationError

from contracts import oip
from contracts.mqtt import TelemetryRecord
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
