"""NMS as a graph stage: append bckd's postprocess to a raw detector ONNX graph (standard ops only).

:func:`append_nms` turns a raw graph (``boxes [B,N,4]``, ``scores [B,N,C]``, optionally
``mask_coeffs [B,N,k]`` and ``proto [B,k,h,w]``) into one whose outputs are the fixed layout of
:mod:`runtime.tasks.nms` (``num_dets, boxes, scores, labels`` [+ ``masks``]), for any batch size
and any N. It builds the same algorithm as :func:`runtime.tasks.nms.host_nms`, which reproduces
ONNX Runtime's ``NonMaxSuppression`` exactly; see that module for the semantics and for where
OpenVINO differs. Everything stays float32 after the raw heads: no class-offset trick (which
would change the IoU rounding and hurt INT8), no casts of boxes or scores.

Graph, per image and batched (nothing is unrolled over the batch):

1. ``m = ReduceMax(scores, axis 2)``; ``Pad`` appends ``pre_top_k`` zero candidates, so
   ``TopK(m, pre_top_k)`` always has enough elements whatever N is; ``GatherND`` (batch_dims 1)
   takes their boxes, scores (and coefficients).
2. ``NonMaxSuppression`` on ``[B,P,4]`` corner boxes and ``[B,C,P]`` scores.
3. ``ScatterND`` writes each selected score into a dense ``[B,C,P]`` of -1; a constant dummy
   selection (pointing at an extra column that is sliced off) is appended first, so no tensor after
   the NMS is ever zero-sized. ``TopK(max_dets)`` over the flattened ``[B,C*P]`` gives scores and
   flat indices; ``valid = score > -0.5``; label = index / P; the box (and coefficients) are
   gathered at index - label * P.
4. Padding rows are masked with ``Where``; masks = ``Sigmoid(MatMul(coeffs, proto))``.

OpenVINO suppresses at IoU >= threshold instead of >: :func:`for_openvino` makes the copy to run
or convert there, so OpenVINO gives ORT's detections too (up to exactly tied scores, whose order
OpenVINO's unstable TopK does not keep).

TensorRT facts this relies on (../shared/design/detection.md §1.2, §1.5, §7):

* The ONNX parser imports ``NonMaxSuppression`` natively from TensorRT 8.5 (JetPack >= 5.1), as
  ``INMSLayer`` from 8.6; older versions need plugins, so use host NMS there. No plugin
  (``EfficientNMS_TRT``, ``BatchedNMS``...) is used: they are deprecated or removed, and ONNX
  Runtime cannot load them.
* TopK's K must be a constant initializer and <= 3840: both K here are initializers
  (``pre_top_k``, ``max_dets``; :class:`~runtime.tasks.nms.NMSSettings` caps them at 3840), and
  nothing data-dependent (NonZero, a shape) feeds K; the dummy padding keeps K <= length.
* ``INMSLayer`` considers only the top 5000 boxes per image (2000 on SM 5.3/6.2, Jetson
  Nano/TX2): the NMS sees ``pre_top_k`` boxes, so keep ``pre_top_k <= 2000`` for those boards.
* TensorRT handles zero-sized tensors poorly, hence the dummy selection row after the NMS.
* NMS layers are slow on TensorRT 10.0-10.6 (NVIDIA/TensorRT#4248); host NMS is the fallback.

onnx is imported lazily; this module never imports torch.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from runtime.errors import BckdError
from runtime.lazy import require
from runtime.tasks.nms import NMSSettings, output_names

MIN_OPSET = 13  # Squeeze/Unsqueeze/ReduceSum take axes as inputs; GatherND has batch_dims (12)
_PREFIX = "bckd_nms/"
IOU_THRESHOLD = _PREFIX + "iou_threshold"  # the NMS IoU threshold initializer
IOU_OPENVINO = _PREFIX + "iou_threshold_openvino"  # the same, one float32 step up (for_openvino)
_FLOAT, _INT32 = 1, 6  # onnx.TensorProto.FLOAT / INT32, without importing onnx at module load


def nms_output_names(with_masks: bool = False) -> tuple[str, ...]:
    """Output names of the graph made by :func:`append_nms`, in order."""
    return output_names(with_masks)


def append_nms(
    model: Any,
    settings: NMSSettings | None = None,
    *,
    boxes: str = "boxes",
    scores: str = "scores",
    mask_coeffs: str | None = None,
    proto: str | None = None,
) -> Any:
    """A copy of ``model`` whose outputs are the detection layout (module docstring).

    ``boxes``/``scores`` (and ``mask_coeffs``/``proto``, both or neither) name outputs of the raw
    graph; its other outputs are dropped. The model's opset (>= 13) is kept.
    """
    onnx = require("onnx", "adding NMS to an ONNX graph")
    settings = settings or NMSSettings()
    if (mask_coeffs is None) != (proto is None):
        raise BckdError("append_nms needs both mask_coeffs and proto for masks; "
                        "pass both or neither")
    raw = [boxes, scores] + ([mask_coeffs, proto] if mask_coeffs is not None else [])
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    opset = _default_opset(out)
    _check_raw_outputs(graph, raw)
    dims = _output_dims(graph, raw)
    renamed = _rename_raw(graph, raw)
    builder = _Builder(onnx, opset)
    builder.build(renamed, settings)
    graph.node.extend(builder.nodes)
    graph.initializer.extend(builder.initializers)
    del graph.output[:]
    graph.output.extend(_output_infos(onnx, len(raw) == 4, dims, settings.max_dets))
    _prune(graph)
    return out


def for_openvino(model: Any) -> Any:
    """A copy of an :func:`append_nms` graph that gives ONNX Runtime's detections on OpenVINO.

    OpenVINO's CPU NMS suppresses at IoU >= threshold where ORT (and the host) suppress at IoU >
    threshold. For float32 IoUs, ``iou >= nextafter(t, +inf)`` is exactly ``iou > t``, so the copy
    carries the next float32 above the IoU threshold (the smallest normal float for a threshold
    of 0), under :data:`IOU_OPENVINO`. A graph already
    adapted is returned unchanged. Use the copy only on OpenVINO (ORT would then keep pairs whose
    IoU is exactly one float32 step above the threshold).
    """
    onnx = require("onnx", "adapting an NMS graph for OpenVINO")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    if IOU_OPENVINO in inits:
        return out
    if IOU_THRESHOLD not in inits:
        raise BckdError("the model has no bckd NMS stage (no initializer "
                        f"{IOU_THRESHOLD!r}); make it with append_nms first")
    threshold = onnx.numpy_helper.to_array(inits[IOU_THRESHOLD]).astype(np.float32)
    # The smallest normal float, not a subnormal, above 0: OpenVINO's CPU kernels may treat
    # subnormals as zero, and IoUs between 0 and 1.2e-38 do not occur.
    bumped = np.maximum(np.nextafter(threshold, np.float32(np.inf)), np.finfo(np.float32).tiny)
    inits[IOU_THRESHOLD].CopyFrom(onnx.numpy_helper.from_array(bumped, IOU_OPENVINO))
    for node in out.graph.node:
        node.input[:] = [IOU_OPENVINO if n == IOU_THRESHOLD else n for n in node.input]
    return out


# -- checks and renaming ---------------------------------------------------------------------------
def _default_opset(model: Any) -> int:
    versions = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if not versions or versions[0] < MIN_OPSET:
        got = versions[0] if versions else "none"
        raise BckdError(f"append_nms needs an ONNX model of opset >= {MIN_OPSET} (got {got}); "
                        f"re-export the raw detector with --opset {max(MIN_OPSET, 17)}")
    return versions[0]


def _check_raw_outputs(graph: Any, raw: list[str]) -> None:
    have = [o.name for o in graph.output]
    for name in raw:
        if name not in have:
            raise BckdError(f"the raw detector graph has no output {name!r} (outputs: "
                            f"{', '.join(have)}); pass the names of its boxes/scores outputs")
    sources = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    for name in raw:
        if name in sources:
            raise BckdError(f"raw output {name!r} is also a graph input or initializer; add an "
                            "Identity node in front of it before appending NMS")
    names = _all_names(graph)
    taken = sorted(n for n in names if n.startswith(_PREFIX))
    if taken:
        raise BckdError(f"the graph already has names starting with {_PREFIX!r} ({taken[0]}); "
                        "NMS was appended to it before, use the raw graph")
    clash = [n for n in output_names(len(raw) == 4) if n in names and n not in raw]
    if clash:
        raise BckdError(f"the raw graph already has a tensor named {clash[0]!r}, an output name of "
                        "the NMS stage; rename it in the raw graph")


def _all_names(graph: Any) -> set[str]:
    names = {v.name for v in list(graph.input) + list(graph.output) + list(graph.value_info)}
    names |= {t.name for t in graph.initializer}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        names.add(node.name)
    return names


def _output_dims(graph: Any, raw: list[str]) -> dict[str, list[Any]]:
    """Each raw output's dims (dim_value int, dim_param str, or None), checked for rank."""
    ranks = dict(zip(raw, (3, 3, 3, 4)))
    dims = {}
    for o in graph.output:
        if o.name not in ranks:
            continue
        shape = o.type.tensor_type.shape
        got = [(d.dim_value if d.HasField("dim_value") else d.dim_param or None) for d in shape.dim]
        if o.type.tensor_type.elem_type != _FLOAT:
            raise BckdError(f"raw output {o.name!r} must be float32 (NMS stays in float)")
        if shape.dim and len(got) != ranks[o.name]:
            raise BckdError(f"raw output {o.name!r} has rank {len(got)}, expected {ranks[o.name]}")
        dims[o.name] = got if shape.dim else [None] * ranks[o.name]
    return {role: dims[name] for role, name in zip(("boxes", "scores", "coeffs", "proto"), raw)}


def _rename_raw(graph: Any, raw: list[str]) -> list[str]:
    """Give the raw outputs internal names, freeing "boxes"/"scores" for the layout outputs."""
    mapping = {name: f"{_PREFIX}raw_{name}" for name in raw}
    _rename_in_graph(graph, mapping)
    for o in graph.output:
        o.name = mapping.get(o.name, o.name)
    return [mapping[name] for name in raw]


def _rename_in_graph(graph: Any, mapping: dict[str, str]) -> None:
    for node in graph.node:
        node.input[:] = [mapping.get(n, n) for n in node.input]
        node.output[:] = [mapping.get(n, n) for n in node.output]
        for attr in node.attribute:  # subgraphs (If/Loop/Scan) may read outer names
            for sub in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
                _rename_in_graph(sub, mapping)
    for info in graph.value_info:
        info.name = mapping.get(info.name, info.name)


def _prune(graph: Any) -> None:
    """Drop nodes that no longer feed an output (those of the dropped raw outputs)."""
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):  # nodes are stored in topological order
        if any(n in needed for n in node.output):
            kept.append(node)
            needed.update(n for n in node.input if n)
            needed.update(_subgraph_reads(node))
    del graph.node[:]
    graph.node.extend(reversed(kept))
    used = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(used)
    infos = [v for v in graph.value_info if v.name in needed]
    del graph.value_info[:]
    graph.value_info.extend(infos)


def _subgraph_reads(node: Any) -> set[str]:
    names: set[str] = set()
    for attr in node.attribute:
        for sub in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
            for inner in sub.node:
                names.update(inner.input)
                names.update(_subgraph_reads(inner))
    return names


def _output_infos(onnx: Any, with_masks: bool, dims: dict[str, list[Any]], k: int) -> list:
    T = onnx.TensorProto
    batch = dims["boxes"][0] or "batch"
    shapes = {
        "num_dets": (T.INT32, [batch, 1]), "boxes": (T.FLOAT, [batch, k, 4]),
        "scores": (T.FLOAT, [batch, k]), "labels": (T.INT32, [batch, k]),
    }
    if with_masks:
        h, w = dims["proto"][2:]
        shapes["masks"] = (T.FLOAT, [batch, k, h or "mask_height", w or "mask_width"])
    return [onnx.helper.make_tensor_value_info(name, *shapes[name])
            for name in output_names(with_masks)]


# -- graph construction ----------------------------------------------------------------------------
class _Builder:
    """Collects the NMS nodes and constants; names carry :data:`_PREFIX`."""

    def __init__(self, onnx: Any, opset: int) -> None:
        self.onnx = onnx
        self.opset = opset
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._consts: dict[str, np.ndarray] = {}
        self._count = 0

    def const(self, name: str, value: Any, dtype: Any) -> str:
        """An initializer (TensorRT wants TopK's K and Pad's pads as initializers), made once."""
        full = _PREFIX + name
        array = np.asarray(value, dtype=dtype)
        if full in self._consts:
            assert np.array_equal(self._consts[full], array) and self._consts[full].dtype == dtype
            return full
        self._consts[full] = array
        self.initializers.append(self.onnx.numpy_helper.from_array(array, full))
        return full

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, out: list[str] | None = None,
           **attrs: Any) -> Any:
        self._count += 1
        tag = f"{_PREFIX}{op_type}_{self._count}"
        outputs = out or [f"{tag}_out{i}" for i in range(n_out)]
        self.nodes.append(self.onnx.helper.make_node(op_type, inputs, outputs, name=tag, **attrs))
        return outputs[0] if len(outputs) == 1 else outputs

    def unsqueeze(self, x: str, axis: int) -> str:
        return self.op("Unsqueeze", [x, self.const(f"axis_{axis}", [axis], np.int64)])

    def reduce_max_classes(self, scores: str) -> str:
        if self.opset >= 18:  # axes became an input in opset 18
            return self.op("ReduceMax", [scores, self.const("axis_2", [2], np.int64)], keepdims=0)
        return self.op("ReduceMax", [scores], axes=[2], keepdims=0)

    def pad_candidates(self, x: str, rank: int, count: int, value: float = 0.0) -> str:
        """Append ``count`` entries of ``value`` along axis 1 (the candidate axis)."""
        pads = [0] * (2 * rank)
        pads[rank + 1] = count
        return self.op("Pad", [x, self.const(f"pads_r{rank}_{count}", pads, np.int64),
                               self.const(f"pad_value_{value:g}", value, np.float32)])

    def gather_rows(self, data: str, index3: str) -> str:
        """data [B, L, ...] at index3 [B, K, 1] -> [B, K, ...]."""
        return self.op("GatherND", [data, index3], batch_dims=1)

    def build(self, raw: list[str], s: NMSSettings) -> None:
        """The NMS nodes after the raw outputs ``raw``; they write the layout's output names."""
        P, K = s.pre_top_k, s.max_dets
        boxes, scores = raw[0], raw[1]
        # 1. pre-top-k by max-class score over N real + P dummy candidates
        m = self.pad_candidates(self.reduce_max_classes(scores), 2, P)
        _, top = self.op("TopK", [m, self.const("pre_top_k", [P], np.int64)], n_out=2,
                         axis=1, largest=1, sorted=1)
        top3 = self.unsqueeze(top, 2)
        boxes_pre = self.gather_rows(self.pad_candidates(boxes, 3, P), top3)
        scores_pre = self.gather_rows(self.pad_candidates(scores, 3, P), top3)
        # 2. per-class NMS on [B,P,4] corners and [B,C,P] scores
        scores_t = self.op("Transpose", [scores_pre], perm=[0, 2, 1])
        selected = self.op("NonMaxSuppression", [
            boxes_pre, scores_t, self.const("max_per_class", [K], np.int64),
            self.const("iou_threshold", [s.iou_threshold], np.float32),
            self.const("score_threshold", [s.score_threshold], np.float32)], center_point_box=0)
        # 3. dense [B,C,P] of -1 with the selected scores, then TopK(max_dets) over C*P
        flat_vals, flat_idx = self.top_selected(scores_t, selected, P, K)
        valid = self.op("Greater", [flat_vals, self.const("valid_above", -0.5, np.float32)])
        p_const = self.const("P", P, np.int64)
        label = self.op("Div", [flat_idx, p_const])  # non-negative, so truncation is floor
        pos3 = self.unsqueeze(self.op("Sub", [flat_idx, self.op("Mul", [label, p_const])]), 2)
        valid3 = self.unsqueeze(valid, 2)
        # 4. the layout
        zero = self.const("zero_f", 0.0, np.float32)
        self.op("Cast", [self.op("ReduceSum", [self.op("Cast", [valid], to=_FLOAT),
                                               self.const("axis_1", [1], np.int64)], keepdims=1)],
                out=["num_dets"], to=_INT32)
        self.op("Where", [valid3, self.gather_rows(boxes_pre, pos3), zero], out=["boxes"])
        self.op("Where", [valid, flat_vals, zero], out=["scores"])
        self.op("Where", [valid, self.op("Cast", [label], to=_INT32),
                          self.const("no_label", -1, np.int32)], out=["labels"])
        if len(raw) == 4:
            self.masks(raw[2], raw[3], top3, pos3, valid3, P)

    def top_selected(self, scores_t: str, selected: str, P: int, K: int) -> list[str]:
        """TopK(K) over the flattened dense [B,C,P] score map of the NMS selection."""
        # The dummy row selects (0, 0, P): an extra column of -1, sliced off below, so the
        # GatherND/ScatterND inputs always have at least one row.
        dummy = self.const("dummy_selection", [[0, 0, P]], np.int64)
        rows = self.op("Concat", [selected, dummy], axis=0)
        scores_ext = self.pad_candidates_last(scores_t, -1.0)  # [B,C,P+1]
        updates = self.op("GatherND", [scores_ext, rows])
        base = self.op("Expand", [self.const("minus_one", -1.0, np.float32),
                                  self.op("Shape", [scores_ext])])
        dense = self.op("ScatterND", [base, rows, updates])
        dense = self.op("Slice", [dense, self.const("slice_start", [0], np.int64),
                                  self.const("slice_end", [P], np.int64),
                                  self.const("axis_2", [2], np.int64)])
        flat = self.op("Reshape", [dense, self.const("flat_shape", [0, -1], np.int64)])
        return self.op("TopK", [flat, self.const("max_dets", [K], np.int64)], n_out=2,
                       axis=1, largest=1, sorted=1)

    def pad_candidates_last(self, x: str, value: float) -> str:
        """Append one entry of ``value`` on the last axis of a rank-3 tensor."""
        return self.op("Pad", [x, self.const("pads_last", [0, 0, 0, 0, 0, 1], np.int64),
                               self.const(f"pad_value_{value:g}", value, np.float32)])

    def masks(self, coeffs: str, proto: str, top3: str, pos3: str, valid3: str, P: int) -> None:
        coeffs_pre = self.gather_rows(self.pad_candidates(coeffs, 3, P), top3)
        coeffs_k = self.gather_rows(coeffs_pre, pos3)  # [B,K,k]
        proto_flat = self.op("Reshape", [proto, self.const("proto_flat", [0, 0, -1], np.int64)])
        masks = self.op("Sigmoid", [self.op("MatMul", [coeffs_k, proto_flat])])  # [B,K,h*w]
        masks = self.op("Where", [valid3, masks, self.const("zero_f", 0.0, np.float32)])
        shape = self.op("Concat", [self.slice_shape(coeffs_k, 0, 2), self.slice_shape(proto, 2, 4)],
                        axis=0)
        self.op("Reshape", [masks, shape], out=["masks"])

    def slice_shape(self, x: str, start: int, end: int) -> str:
        return self.op("Slice", [self.op("Shape", [x]),
                                 self.const(f"dim_start_{start}", [start], np.int64),
                                 self.const(f"dim_end_{end}", [end], np.int64)])
