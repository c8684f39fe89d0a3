"""Pruning on ONNX graphs: magnitude (zero the smallest weights) and structured (remove
whole output channels / neurons and shrink the layers that consume them).

Structured pruning follows each prunable layer's output through channel-preserving
operators (activations, pooling, batch norm, per-channel bias, transposes, a flatten) to
the layers that read it, and shrinks those too. A layer whose output goes anywhere else (a
model output, a residual add, a concat) is left whole, and the report says why. Every
shrunk layer is checked by running the model; a layer that breaks it is put back.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import StepError

__all__ = ["PruneReport", "magnitude_prune", "structured_prune"]

PruneScope = Literal["global", "layer"]

# Operators whose weight (input 1) is pruned.
_WEIGHTED = {"Conv", "Gemm", "MatMul"}
# Operators that keep every channel where it is, elementwise or per channel.
_PASSTHROUGH = {
    "Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "Elu", "Selu", "HardSigmoid", "HardSwish",
    "Softplus", "Clip", "Dropout", "Identity",
}  # fmt: skip
_POOLS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool"}
_CHANNEL_BINARY = {"Add", "Sub", "Mul", "Div"}


@dataclass
class PruneReport:
    """``achieved_sparsity``: the share of the original weights now zero or removed."""

    mode: str
    target_sparsity: float
    parameters_before: int
    parameters_after: int
    size_bytes_before: int
    size_bytes_after: int
    compressed_bytes_before: int
    compressed_bytes_after: int
    achieved_sparsity: float
    layers: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)

    def as_detail(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _parameters(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(init.dims)) for init in model.graph.initializer)


def _sizes(model: onnx.ModelProto) -> tuple[int, int]:
    data = model.SerializeToString()
    return len(data), len(zlib.compress(data, 6))


def _weights(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Float initializers of rank >= 2 read as the weight of a Conv, Gemm or MatMul."""
    inits = {i.name: i for i in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type in _WEIGHTED and len(node.input) > 1 and node.input[1] in inits:
            init = inits[node.input[1]]
            if len(init.dims) >= 2 and init.data_type == onnx.TensorProto.FLOAT:
                found[init.name] = init
    return found


def _report(
    mode: str, target: float, before: onnx.ModelProto, after: onnx.ModelProto
) -> PruneReport:
    total = sum(int(np.prod(w.dims)) for w in _weights(before).values())
    nonzero = sum(int(np.count_nonzero(numpy_helper.to_array(w))) for w in _weights(after).values())
    (size_b, comp_b), (size_a, comp_a) = _sizes(before), _sizes(after)
    return PruneReport(
        mode=mode,
        target_sparsity=target,
        parameters_before=_parameters(before),
        parameters_after=_parameters(after),
        size_bytes_before=size_b,
        size_bytes_after=size_a,
        compressed_bytes_before=comp_b,
        compressed_bytes_after=comp_a,
        achieved_sparsity=1.0 - nonzero / total if total else 0.0,
    )


def _check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")


def magnitude_prune(
    model: onnx.ModelProto, sparsity: float, scope: PruneScope = "global"
) -> tuple[onnx.ModelProto, PruneReport]:
    """Zero the smallest-magnitude weights: ``sparsity`` of all of them (``global``) or of
    each layer (``layer``). Shapes stay; the model compresses better and sparse kernels gain."""
    _check_sparsity(sparsity)
    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    weights = _weights(pruned)
    arrays = {name: numpy_helper.to_array(w).copy() for name, w in weights.items()}
    if scope == "global" and arrays:
        magnitudes = np.concatenate([np.abs(a).ravel() for a in arrays.values()])
        threshold = _threshold(magnitudes, sparsity)
        for array in arrays.values():
            array[np.abs(array) < threshold] = 0.0
    else:
        for array in arrays.values():
            array[np.abs(array) < _threshold(np.abs(array).ravel(), sparsity)] = 0.0
    for name, array in arrays.items():
        weights[name].CopyFrom(numpy_helper.from_array(array, name))
    report = _report(f"magnitude-{scope}", sparsity, model, pruned)
    report.layers = [
        {"weight": name, "sparsity": float(np.mean(array == 0))} for name, array in arrays.items()
    ]
    return pruned, report


def _threshold(magnitudes: np.ndarray, sparsity: float) -> float:
    """The magnitude below which ``sparsity`` of the values fall (exact count, no ties)."""
    count = int(sparsity * magnitudes.size)
    if count == 0:
        return 0.0
    return float(np.partition(magnitudes, count - 1)[count - 1] + np.finfo(np.float32).tiny)


# --- structured ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Channels:
    """The channels sit on ``axis`` of a tensor of rank ``rank``."""

    axis: int
    rank: int


@dataclass(frozen=True)
class _Flat:
    """A 2-D tensor flattened from channels x ``spatial`` positions, channel-major (NCHW) or
    channel-minor (NHWC)."""

    spatial: int
    channel_major: bool


@dataclass(frozen=True)
class _Edit:
    """Keep the chosen channels of ``initializer`` along ``axis``; ``flat`` expands them.

    With ``axis`` None, ``initializer`` is a reshape target whose last entry is the
    flattened size, channels x ``flat.spatial``, and is set to the new size.
    """

    initializer: str
    axis: int | None
    flat: _Flat | None = None


class _Skip(Exception):
    pass


class _Graph:
    def __init__(self, model: onnx.ModelProto) -> None:
        inferred = onnx.shape_inference.infer_shapes(model)
        self.model = model
        self.inits = {i.name: i for i in model.graph.initializer}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in model.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.outputs = {o.name for o in model.graph.output}
        self.shapes: dict[str, list[int | None]] = {}
        for info in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
            dims = info.type.tensor_type.shape.dim
            self.shapes[info.name] = [
                d.dim_value if d.HasField("dim_value") else None for d in dims
            ]
        self.init_users: dict[str, int] = {}
        for node in model.graph.node:
            for name in node.input:
                if name in self.inits:
                    self.init_users[name] = self.init_users.get(name, 0) + 1

    def own_init(self, name: str) -> onnx.TensorProto:
        if name not in self.inits:
            raise _Skip(f"{name!r} is computed, not a stored weight")
        if self.init_users[name] != 1:
            raise _Skip(f"weight {name!r} is shared by several nodes")
        return self.inits[name]

    def attr(self, node: onnx.NodeProto, name: str, default: Any) -> Any:
        for a in node.attribute:
            if a.name == name:
                return onnx.helper.get_attribute_value(a)
        return default


def _producer_edits(
    graph: _Graph, node: onnx.NodeProto
) -> tuple[list[_Edit], np.ndarray, _Channels]:
    """What shrinking ``node``'s outputs touches in the node itself, each channel's L1 norm,
    and where the channels sit in its output."""
    weight = graph.own_init(node.input[1])
    w = numpy_helper.to_array(weight)
    out_rank = len(graph.shapes.get(node.output[0], [])) or (4 if node.op_type == "Conv" else 2)
    if node.op_type == "Conv":
        if graph.attr(node, "group", 1) != 1:
            raise _Skip("grouped convolution")
        axis, channels = 0, _Channels(1, out_rank)
    elif node.op_type == "Gemm":
        if graph.attr(node, "transA", 0):
            raise _Skip("Gemm with transA")
        axis, channels = (0 if graph.attr(node, "transB", 0) else 1), _Channels(1, 2)
    else:  # MatMul
        if w.ndim != 2:
            raise _Skip("MatMul with a weight of rank other than 2")
        axis, channels = 1, _Channels(out_rank - 1, out_rank)
    edits = [_Edit(weight.name, axis)]
    if node.op_type in ("Conv", "Gemm") and len(node.input) > 2 and node.input[2]:
        bias = graph.own_init(node.input[2])
        if len(bias.dims) != 1:
            raise _Skip("bias of rank other than 1")
        edits.append(_Edit(bias.name, 0))
    norms = np.abs(w).sum(axis=tuple(i for i in range(w.ndim) if i != axis))
    return edits, norms, channels


def _follow(graph: _Graph, tensor: str, where: _Channels | _Flat, width: int) -> list[_Edit]:
    """Edits in every layer reading ``tensor``, down to the layers that consume the channels."""
    if tensor in graph.outputs:
        raise _Skip("its output is a model output")
    edits: list[_Edit] = []
    users = graph.consumers.get(tensor, [])
    if not users:
        raise _Skip("its output is unused")
    for user in users:
        if user.op_type == "Shape":
            continue  # reads the shape at run time, adapts by itself
        edits += _through(graph, user, tensor, where, width)
    return edits


def _through(
    graph: _Graph, node: onnx.NodeProto, tensor: str, where: _Channels | _Flat, width: int
) -> list[_Edit]:
    op = node.op_type
    if op in ("Conv", "Gemm", "MatMul") and node.input[0] == tensor:
        return [_consumer_edit(graph, node, where)]
    if isinstance(where, _Flat):
        raise _Skip(f"a flattened output feeds {op}")
    if op in _PASSTHROUGH and node.input[0] == tensor:
        if op == "PRelu":
            raise _Skip("PRelu slopes are not pruned")
        return _follow(graph, node.output[0], where, width)
    if op in _POOLS and where.axis == 1:
        return _follow(graph, node.output[0], where, width)
    if op == "BatchNormalization" and where.axis == 1 and node.input[0] == tensor:
        params = [_Edit(graph.own_init(name).name, 0) for name in node.input[1:5]]
        return params + _follow(graph, node.output[0], where, width)
    if op in _CHANNEL_BINARY:
        return _binary(graph, node, tensor, where, width)
    if op == "Transpose":
        perm = list(graph.attr(node, "perm", reversed(range(where.rank))))
        return _follow(graph, node.output[0], _Channels(perm.index(where.axis), where.rank), width)
    if op in ("Flatten", "Reshape"):
        flat = _flatten(graph, node, tensor, where)
        resize = _reshape_size_edits(graph, node, flat, width) if op == "Reshape" else []
        return resize + _follow(graph, node.output[0], flat, width)
    raise _Skip(f"its output feeds {op} {node.name or node.output[0]!r}")


def _binary(
    graph: _Graph, node: onnx.NodeProto, tensor: str, where: _Channels, width: int
) -> list[_Edit]:
    other = node.input[1] if node.input[0] == tensor else node.input[0]
    if other not in graph.inits:
        raise _Skip(f"its output meets another branch in {node.op_type}")
    init = graph.own_init(other)
    offset = where.rank - len(init.dims)
    axis = where.axis - offset
    edits = []
    if 0 <= axis < len(init.dims) and init.dims[axis] == width:
        edits.append(_Edit(init.name, axis))
    elif int(np.prod(init.dims)) != 1 and (axis < 0 or init.dims[axis] != 1):
        raise _Skip(f"{node.op_type} operand {other!r} does not broadcast per channel")
    return edits + _follow(graph, node.output[0], where, width)


def _flatten(graph: _Graph, node: onnx.NodeProto, tensor: str, where: _Channels) -> _Flat:
    shape = graph.shapes.get(tensor)
    out_shape = graph.shapes.get(node.output[0])
    if not shape or len(shape) != 4 or any(d is None for d in shape[1:]):
        raise _Skip(f"{node.op_type} of a tensor without a static 4-D shape")
    _, d1, d2, d3 = (int(d or 0) for d in shape)
    if not out_shape or len(out_shape) != 2:
        raise _Skip(f"{node.op_type} that does not flatten to 2-D")
    if node.op_type == "Flatten" and graph.attr(node, "axis", 1) != 1:
        raise _Skip("Flatten on an axis other than 1")
    if where.axis == 1:
        return _Flat(d2 * d3, channel_major=True)
    if where.axis == 3:
        return _Flat(d1 * d2, channel_major=False)
    raise _Skip(f"{node.op_type} with channels on axis {where.axis}")


def _reshape_size_edits(
    graph: _Graph, node: onnx.NodeProto, flat: _Flat, width: int
) -> list[_Edit]:
    """The constant holding the flattened size in a Reshape's target, if it is not -1.

    Converters often build the target as Concat(batch from Shape, [size]) behind Casts.
    """
    size = width * flat.spatial
    producers = {out: n for n in graph.model.graph.node for out in n.output}
    pending, seen = [node.input[1]], set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in graph.inits:
            values = numpy_helper.to_array(graph.inits[name]).ravel().tolist()
            if values and values[-1] == -1:
                return []
            if values and values[-1] == size:
                return [_Edit(graph.own_init(name).name, None, flat)]
        elif name in producers and producers[name].op_type in ("Concat", "Cast", "Identity"):
            pending.extend(producers[name].input)
    raise _Skip("Reshape to a size it cannot update")


def _consumer_edit(graph: _Graph, node: onnx.NodeProto, where: _Channels | _Flat) -> _Edit:
    weight = graph.own_init(node.input[1])
    flat = where if isinstance(where, _Flat) else None
    if node.op_type == "Conv":
        if flat or graph.attr(node, "group", 1) != 1 or where.axis != 1:  # type: ignore[union-attr]
            raise _Skip("it feeds a convolution in an unsupported way")
        return _Edit(weight.name, 1)
    if node.op_type == "Gemm":
        if graph.attr(node, "transA", 0):
            raise _Skip("it feeds a Gemm with transA")
        return _Edit(weight.name, 1 if graph.attr(node, "transB", 0) else 0, flat)
    if len(weight.dims) != 2 or (not flat and where.axis != where.rank - 1):  # type: ignore[union-attr]
        raise _Skip("it feeds a MatMul in an unsupported way")
    return _Edit(weight.name, 0, flat)


def _kept_indices(edit: _Edit, kept: np.ndarray, width: int) -> np.ndarray:
    if edit.flat is None:
        return kept
    s = edit.flat.spatial
    if edit.flat.channel_major:
        return (kept[:, None] * s + np.arange(s)[None, :]).ravel()
    return (np.arange(s)[:, None] * width + kept[None, :]).ravel()


def _apply(model: onnx.ModelProto, edits: Iterable[_Edit], kept: np.ndarray, width: int) -> None:
    inits = {i.name: i for i in model.graph.initializer}
    for edit in edits:
        array = numpy_helper.to_array(inits[edit.initializer])
        if edit.axis is None:
            assert edit.flat is not None
            smaller = array.copy()
            smaller.reshape(-1)[-1] = len(kept) * edit.flat.spatial
        else:
            smaller = np.take(array, _kept_indices(edit, kept, width), axis=edit.axis)
        inits[edit.initializer].CopyFrom(numpy_helper.from_array(smaller, edit.initializer))
    del model.graph.value_info[:]  # stale shapes; onnxruntime infers them again


def _runs(model: onnx.ModelProto) -> str | None:
    """None if onnxruntime loads ``model`` and runs it on zeros, else the error."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(
            model.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        feeds = {}
        for arg in session.get_inputs():
            shape = [d if isinstance(d, int) else 1 for d in arg.shape]
            dtype = np.float32 if arg.type == "tensor(float)" else np.int64
            feeds[arg.name] = np.zeros(shape, dtype)
        session.run(None, feeds)
    except Exception as e:  # onnxruntime's exceptions are not typed
        return str(e).splitlines()[0]
    return None


def structured_prune(
    model: onnx.ModelProto, sparsity: float
) -> tuple[onnx.ModelProto, PruneReport]:
    """Remove ``sparsity`` of the output channels (lowest L1 norm first) of every layer that
    can shrink, and the matching inputs of the layers after it."""
    _check_sparsity(sparsity)
    error = _runs(model)
    if error is not None:
        raise StepError(f"structured pruning needs a model onnxruntime can run: {error}")
    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    layers, skipped = [], []
    for index in range(len(pruned.graph.node)):
        node = pruned.graph.node[index]
        label = node.name or node.output[0]
        if node.op_type not in _WEIGHTED or len(node.input) < 2:
            continue
        graph = _Graph(pruned)
        try:
            own, norms, where = _producer_edits(graph, node)
            edits = own + _follow(graph, node.output[0], where, len(norms))
        except _Skip as reason:
            skipped.append({"node": label, "reason": str(reason)})
            continue
        width = len(norms)
        keep = max(1, width - int(sparsity * width))
        if keep == width:
            continue
        kept = np.sort(np.argsort(-norms, kind="stable")[:keep])
        attempt = onnx.ModelProto()
        attempt.CopyFrom(pruned)
        _apply(attempt, edits, kept, width)
        error = _runs(attempt)
        if error is not None:
            skipped.append({"node": label, "reason": f"the model did not run shrunk: {error}"})
            continue
        pruned = attempt
        layers.append({"node": label, "channels_before": width, "channels_after": keep})
    report = _report("structured", sparsity, model, pruned)
    report.layers, report.skipped = layers, skipped
    return pruned, report
