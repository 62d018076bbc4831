"""Half-precision ONNX (fp16 or bf16): weights and activations in 16 bits, the fragile parts kept in float32.

onnxruntime's transformers float16 converter is not a dependency, so this is a small, typed graph rewrite:

- A node runs in 16 bits iff it depends on the image input ``x`` and is not a normalisation or softmax.
  * GroupNorm (exported as InstanceNormalization over [N, G, -1]), LayerNorm and softmax reduce over thousands of
    values: in fp16 the sums of squares overflow (max 65504) or lose their low bits, so they stay fp32
    (improved-diffusion's GroupNorm32 makes the same choice in PyTorch). bf16 has fp32's range but 8 bits of
    mantissa, so the same ops stay fp32 for precision.
  * Everything computed from ``t`` alone (the sinusoidal embedding and the time MLP) stays fp32: timesteps reach
    999, where the fp16 spacing is 0.5 (bf16: 4), so sin(t * f) of a 16-bit argument is noise. A few tiny Gemms.
    A conditional model's class embedding (a Gather on ``y``) and its sum with the time embedding too.
- The I/O contract does not change: ``x`` float32, ``t`` (and ``y``) int64, ``model_output`` float32 (Casts at
  the edges).
- Casts are inserted where a tensor's precision and its consumer's differ; an fp32 weight read by 16-bit nodes
  gets a 16-bit copy (rounded once, offline) instead of a runtime Cast. Which inputs may change type is read from
  the operator schema (e.g. Resize's ``scales`` is float32 by definition and stays so).
- bf16 Conv needs opset >= 22 (Conv-11 allows no bfloat16), so a bf16 conversion first moves the graph to opset
  22 with onnx's version converter. The GroupNorm decomposition (InstanceNormalization) is kept as it is.

The fp16 file is what ``ddpm export --fp16`` writes; TensorRT builds its fp16/bf16 engines from these graphs as
strongly typed networks (TensorRT 11 removed the weakly typed FP16/BF16 builder flags).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ddpm.errors import InvalidArgumentError

__all__ = ["FP32_OPS", "HALF_TYPES", "convert_to_half"]

# Reductions whose 16-bit accumulation overflows or loses precision: kept float32.
FP32_OPS = frozenset(
    {
        "InstanceNormalization",
        "GroupNormalization",
        "LayerNormalization",
        "BatchNormalization",
        "Softmax",
        "LogSoftmax",
        "ReduceMean",
        "ReduceSumSquare",
        "ReduceL2",
    }
)
# name -> (ONNX elem type (TensorProto.FLOAT16 / BFLOAT16), schema type string, largest finite value, minimum opset)
HALF_TYPES = {
    "fp16": (10, "tensor(float16)", 65504.0, 18),
    "bf16": (16, "tensor(bfloat16)", 3.3895e38, 22),
}


def convert_to_half(model: Any, dtype: str = "fp16", *, image_input: str = "x") -> Any:
    """Return a new ``onnx.ModelProto``: the fp16 or bf16 variant of ``model`` (see the module docstring).

    Raises InvalidArgumentError (``... is not supported for this model: why``) for graphs it cannot convert
    safely: subgraphs, custom domains or model-local functions, tensors of unknown type, weights out of range.
    """
    import ml_dtypes
    import onnx
    from onnx import TensorProto, helper, numpy_helper, version_converter

    if dtype not in HALF_TYPES:
        raise InvalidArgumentError(f"unknown half precision {dtype!r}; allowed: {', '.join(HALF_TYPES)}")
    HALF, half_str, half_max, min_opset = HALF_TYPES[dtype]
    np_half = np.float16 if dtype == "fp16" else ml_dtypes.bfloat16
    FLOAT = TensorProto.FLOAT
    type_str = {FLOAT: "tensor(float)", HALF: half_str}

    def _unsupported(why: str) -> InvalidArgumentError:
        return InvalidArgumentError(f"{dtype} export is not supported for this model: {why}")

    if model.functions:
        raise _unsupported(
            f"the graph calls {len(model.functions)} model-local function(s); inline them first"
        )
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < min_opset:
        model = version_converter.convert_version(model, min_opset)
        opset = min_opset
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    g = inferred.graph
    if image_input not in {i.name for i in g.input}:
        raise _unsupported(f"the graph has no input named {image_input!r}")

    orig_type: dict[str, int] = {}  # tensor name -> ONNX elem type, in the ORIGINAL graph
    for vi in [*g.input, *g.value_info, *g.output]:
        orig_type[vi.name] = vi.type.tensor_type.elem_type
    inits = {t.name: t for t in g.initializer}
    for t in g.initializer:
        orig_type[t.name] = t.data_type
    graph_outputs = {o.name for o in g.output}

    # Which nodes depend (transitively) on x: only those may run in 16 bits.
    from_x = {image_input}
    for node in g.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise _unsupported(f"node {node.name or node.op_type} has a subgraph (control flow)")
        if node.domain not in ("", "ai.onnx"):
            raise _unsupported(f"node {node.name or node.op_type} is in the custom domain {node.domain!r}")
        if any(i in from_x for i in node.input if i):
            from_x.update(o for o in node.output if o)

    now: dict[str, int] = {}  # tensor name -> elem type in the NEW graph
    now.update({i.name: i.type.tensor_type.elem_type for i in g.input})
    now.update({name: t.data_type for name, t in inits.items()})
    new_nodes: list[Any] = []
    new_inits: dict[str, Any] = {}
    casts: dict[tuple[str, int], str] = {}  # (tensor, elem type) -> name of the converted tensor
    renamed: dict[str, str] = {}  # graph outputs that became 16-bit get a new name + a Cast back

    def converted(name: str, want: int) -> str:
        key = (name, want)
        if key in casts:
            return casts[key]
        new = f"{name}__{dtype if want == HALF else 'fp32'}"
        if name in inits:  # round a weight once, offline, instead of a runtime Cast
            arr = numpy_helper.to_array(inits[name]).astype(np.float32)
            if want == HALF and np.abs(arr).max(initial=0.0) > half_max:
                raise _unsupported(
                    f"weight {name!r} has values beyond the {dtype} range (|w| > {half_max:g})"
                )
            new_inits[new] = numpy_helper.from_array(arr.astype(np_half if want == HALF else np.float32), new)
        else:
            new_nodes.append(helper.make_node("Cast", [name], [new], to=want, name=f"cast_{new}"))
        casts[key] = new
        now[new] = want
        return new

    for node in g.node:
        node = _copy(node)
        node.input[:] = [renamed.get(i, i) for i in node.input]
        half = any(o in from_x for o in node.output) and node.op_type not in FP32_OPS
        if node.op_type == "Constant":  # constants keep their type; consumers cast (folded by the runtime)
            for o in node.output:
                now[o] = orig_type.get(o, FLOAT)
        elif node.op_type == "Cast":
            to = next(a for a in node.attribute if a.name == "to")
            if half and to.i == FLOAT:
                to.i = HALF
            now[node.output[0]] = to.i
        else:
            try:
                schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
            except onnx.defs.SchemaError:
                raise _unsupported(f"no ONNX schema for {node.op_type} at opset {opset}") from None
            constraints = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
            # Shape-only consumers (Shape, Size, ...) read either precision as it is: no Cast just for them.
            float_out = any(orig_type.get(o) == FLOAT for o in node.output if o)
            half_params: set[str] = set()
            for slot, name in enumerate(node.input):
                if not name:
                    continue
                have = now.get(name)
                if have is None:
                    raise _unsupported(f"the type of tensor {name!r} (input of {node.op_type}) is unknown")
                if have not in (FLOAT, HALF):
                    continue
                formal = schema.inputs[min(slot, len(schema.inputs) - 1)]
                allowed = constraints.get(formal.type_str)
                want = HALF if half and allowed and half_str in allowed else FLOAT
                if not float_out and allowed and type_str[have] in allowed:
                    want = have
                if want == HALF:
                    half_params.add(formal.type_str)
                if have != want:
                    node.input[slot] = converted(name, want)
            for slot, out in enumerate(node.output):
                if not out:
                    continue
                formal = schema.outputs[min(slot, len(schema.outputs) - 1)]
                orig = orig_type.get(out)
                if orig is None:
                    raise _unsupported(f"the type of tensor {out!r} (output of {node.op_type}) is unknown")
                now[out] = HALF if orig == FLOAT and formal.type_str in half_params else orig
        new_nodes.append(node)
        for slot, out in enumerate(node.output):
            if out in graph_outputs and now[out] == HALF:
                node.output[slot] = renamed[out] = f"{out}__{dtype}"
                now[node.output[slot]] = HALF
                new_nodes.append(
                    helper.make_node("Cast", [node.output[slot]], [out], to=FLOAT, name=f"cast_{out}")
                )
                now[out] = FLOAT

    used = {i for n in new_nodes for i in n.input}
    out_model = onnx.ModelProto()
    out_model.CopyFrom(model)
    graph = out_model.graph
    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.value_info[:]  # the original intermediate types are stale; shape inference recomputes them
    kept = [t for t in model.graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend([*kept, *new_inits.values()])
    return out_model


def _copy(node: Any) -> Any:
    from onnx import NodeProto

    c = NodeProto()
    c.CopyFrom(node)
    return c
