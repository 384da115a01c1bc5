"""Hostile values in well-formed messages: tensors whose shape, dtype and data
disagree, huge and negative numbers, odd names and values nested deep, in Infer, Call
and Grad requests, each with whether the server must refuse it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from hypothesis import strategies as st

from support.fuzz.service import FUNCTION_NAMES, MODEL_INPUTS, MODELS
from tensorwire.v1 import tensorwire_pb2 as pb
from tensorwire.wire.dtypes import NUMPY_BY_WIRE, WIRE_BY_NAME
from tensorwire_server.engine.functions import FUNCTIONS

WIRE_DTYPES = sorted(NUMPY_BY_WIRE)
SMALL_INTS = st.integers(-3, 8)
# Far past any memory (a size from them fails to allocate at once) or past int64.
HUGE_INTS = st.sampled_from([2**40, -(2**40), 2**62, -(2**62), 2**63 - 1, -(2**63)])
FLOATS = st.one_of(
    st.floats(-10, 10),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e300, -1e300, 5e-324, -0.0]),
)
names = st.one_of(
    st.sampled_from(["", "input", "output", "x", "y", "sum", "prod", "a", "0", "1", "-1"]),
    st.text(st.characters(exclude_categories=["Cs"]), max_size=12),
    st.sampled_from(["\x00", "名前", "é\u0301", "input ", "a" * 10_000, "b" * 100_000]),
)
dims = st.one_of(
    st.integers(0, 4),
    st.sampled_from([-1, -(2**63), 2**31, 2**32, 2**40, 2**62, 2**63 - 1]),
    st.integers(-(2**63), 2**63 - 1),
)


@dataclass(frozen=True)
class Hostile:
    """A generated message part and whether it is certainly refused where it is used."""

    message: Any
    bad: bool


@st.composite
def good_tensor(
    draw: st.DrawFn, dtypes: Sequence[int] = WIRE_DTYPES, ndim: int | None = None
) -> Hostile:
    """A valid tensor: known dtype, small shape, exactly its bytes (bool: 0 or 1)."""
    dtype = draw(st.sampled_from(dtypes))
    rank = draw(st.integers(0, 3)) if ndim is None else ndim
    shape = draw(st.lists(st.integers(0, 4), min_size=rank, max_size=rank))
    size = int(np.prod(shape)) * NUMPY_BY_WIRE[dtype].itemsize
    data = draw(st.binary(min_size=size, max_size=size))
    if dtype == pb.DTYPE_BOOL:
        data = bytes(b & 1 for b in data)
    return Hostile(pb.Tensor(dtype=dtype, shape=shape, data=data), False)


@st.composite
def bad_tensor(draw: st.DrawFn) -> Hostile:
    """A tensor every receiver must refuse, one fault at a time."""
    tensor: pb.Tensor = draw(good_tensor()).message
    fault = draw(st.integers(0, 7))
    if fault == 0:
        tensor.dtype = pb.DTYPE_UNSPECIFIED
    elif fault == 1:
        tensor.dtype = draw(
            st.integers(len(WIRE_DTYPES) + 1, 2**31 - 1) | st.integers(-(2**31), -1)
        )
    elif fault == 2:
        tensor.shape.insert(
            draw(st.integers(0, len(tensor.shape))), draw(st.integers(-(2**63), -1))
        )
    elif fault == 3:  # more elements than int64 counts
        tensor.shape[:] = [2**40, 2**40, *draw(st.lists(st.integers(1, 3), max_size=2))]
    elif fault == 4:  # a payload that disagrees with the shape
        size = len(tensor.data)
        tensor.data = draw(st.binary(max_size=64).filter(lambda b: len(b) != size))
    elif fault == 5:  # bool bytes other than 0 and 1
        count = draw(st.integers(1, 6))
        tensor.dtype, tensor.shape[:] = pb.DTYPE_BOOL, [count]
        tensor.data = draw(st.binary(min_size=count, max_size=count).filter(lambda b: max(b) > 1))
    elif fault == 6:  # more dimensions than an array has
        tensor.shape[:], tensor.data = (
            [1] * draw(st.integers(65, 100)),
            bytes(NUMPY_BY_WIRE[tensor.dtype].itemsize),
        )
    else:  # an empty tensor whose other dimensions overflow: no array has that shape
        tensor.shape[:] = [
            0,
            *draw(st.sampled_from([[2**62, 2**62], [2**63 - 1, 2], [2**40, 2**40, 2**40]])),
        ]
        tensor.data = b""
    return Hostile(tensor, True)


@st.composite
def any_tensor(draw: st.DrawFn) -> Hostile:
    """Fields drawn independently: valid or not, nobody knows beforehand."""
    dtype = draw(st.sampled_from(WIRE_DTYPES) | st.integers(-(2**31), 2**31 - 1))
    shape = draw(st.lists(dims, max_size=5))
    data = draw(st.binary(max_size=48))
    return Hostile(pb.Tensor(dtype=dtype, shape=shape, data=data), False)


floating = [pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT64, pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT64, pb.DTYPE_INT64]
tensors = st.one_of(good_tensor(), good_tensor(floating), bad_tensor(), any_tensor())


def _value(kind: str, payload: Any) -> pb.Value:
    value = pb.Value()
    if kind == "tensor":
        value.tensor.CopyFrom(payload)
    elif kind == "list_value":
        value.list_value.SetInParent()
        value.list_value.values.extend(payload)
    elif kind != "empty":
        setattr(value, kind, payload)
    return value


leaf_values = st.one_of(
    tensors.map(lambda h: Hostile(_value("tensor", h.message), h.bad)),
    st.booleans().map(lambda b: Hostile(_value("bool_value", b), False)),
    (SMALL_INTS | HUGE_INTS).map(lambda i: Hostile(_value("int_value", i), False)),
    FLOATS.map(lambda f: Hostile(_value("float_value", f), False)),
    names.map(lambda s: Hostile(_value("string_value", s), False)),
    st.just(Hostile(_value("none_value", True), False)),
    st.just(Hostile(_value("empty", None), True)),  # no kind set
)
values = st.recursive(
    leaf_values,
    lambda inner: st.lists(inner, max_size=4).map(
        lambda items: Hostile(
            _value("list_value", [h.message for h in items]), any(h.bad for h in items)
        )
    ),
    max_leaves=6,
)
kwarg_names = st.one_of(
    st.sampled_from(
        [
            "dim",
            "keepdim",
            "dtype",
            "out",
            "p",
            "n",
            "k",
            "input",
            "other",
            "weight",
            "bias",
            "reduction",
            "inplace",
            "equation",
            "min",
            "max",
            "kernel_size",
            "stride",
            "",
            "self",
        ]
    ),
    names,
)
models = st.sampled_from(sorted(MODELS)) | names
functions = st.one_of(
    st.sampled_from(FUNCTION_NAMES),
    st.sampled_from(
        [
            "matmul_",
            "torch.matmul",
            "linalg",
            "__import__",
            "eval",
            "os.system",
            "load",
            "save",
            "zeros",
            "manual_seed",
            "add_",
            "nn.functional.dropout",
        ]
    ),
    names,
)


def model_inputs(model: str) -> st.SearchStrategy[list[tuple[str, Hostile]]]:
    """Named inputs: sometimes exactly what ``model`` takes, else anything."""
    fitting: dict[str, st.SearchStrategy[list[tuple[str, Hostile]]]] = {
        "mlp": st.tuples(st.just(""), good_tensor([pb.DTYPE_FLOAT32], 2)).map(lambda p: [p]),
        "two_heads": st.tuples(
            st.tuples(st.just("x"), good_tensor([pb.DTYPE_FLOAT64], 1)),
            st.tuples(st.just("y"), good_tensor([pb.DTYPE_FLOAT64], 1)),
        ).map(list),
    }
    anything = st.lists(st.tuples(names, tensors), max_size=4)
    return fitting.get(model, anything) | anything


@st.composite
def hostile_infer(draw: st.DrawFn) -> tuple[pb.InferRequest, bool]:
    model = draw(models)
    inputs = draw(model_inputs(model))
    outputs = draw(st.lists(names, max_size=2))
    message = pb.InferRequest(
        model=model,
        inputs=[pb.NamedTensor(name=n, tensor=h.message) for n, h in inputs],
        outputs=outputs,
    )
    return message, model not in MODELS or any(h.bad for _, h in inputs)


@st.composite
def hostile_call(draw: st.DrawFn) -> tuple[pb.CallRequest, bool]:
    function = draw(functions)
    args = draw(st.lists(values, max_size=4))
    kwargs = draw(st.dictionaries(kwarg_names, values, max_size=3))
    message = pb.CallRequest(function=function, args=[h.message for h in args])
    for name, h in kwargs.items():
        message.kwargs[name].CopyFrom(h.message)
    bad = (
        function not in FUNCTIONS
        or any(h.bad for h in [*args, *kwargs.values()])
        or "out" in kwargs
        or (
            kwargs.get("dtype") is not None
            and kwargs["dtype"].message.WhichOneof("kind") == "string_value"
            and kwargs["dtype"].message.string_value not in WIRE_BY_NAME
        )
    )
    return message, bad


@st.composite
def hostile_grad(draw: st.DrawFn) -> tuple[pb.GradRequest, bool]:
    grad_outputs = draw(st.lists(st.tuples(names, tensors), max_size=2))
    message = pb.GradRequest(
        grad_outputs=[pb.NamedTensor(name=n, tensor=h.message) for n, h in grad_outputs],
        param_grads=draw(st.booleans()),
    )
    bad = any(h.bad for _, h in grad_outputs)
    if draw(st.booleans()):
        call_message, call_bad = draw(hostile_call())
        message.function = call_message.function
        message.args.extend(call_message.args)
        for name, value in call_message.kwargs.items():
            message.kwargs[name].CopyFrom(value)
        # Inputs are named by position, so names mostly from those, in any order.
        wrt = draw(st.lists(st.sampled_from(["0", "1", "2"]) | names, max_size=3))
        # A name that is no position is never an input.
        bad |= call_bad or message.param_grads or any(not w.isdecimal() for w in wrt)
    else:
        infer_message, infer_bad = draw(hostile_infer())
        if infer_message.model or draw(st.booleans()):
            message.model = infer_message.model
        message.inputs.extend(infer_message.inputs)
        given = {nt.name for nt in infer_message.inputs}
        known = MODEL_INPUTS.get(infer_message.model, given)
        wrt = draw(st.lists(st.sampled_from(sorted(known) or [""]) | names, max_size=3))
        bad |= infer_bad or any(w not in known for w in wrt)
    message.wrt.extend(wrt)
    bad |= len(set(wrt)) < len(wrt)  # a name twice
    return message, bad


hostile = st.one_of(
    hostile_infer().map(lambda m: ("Infer", *m)),
    hostile_grad().map(lambda m: ("Grad", *m)),
    hostile_call().map(lambda m: ("Call", *m)),
)
