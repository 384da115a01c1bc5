"""The client's messages: request builders (arguments -> encoder) and response
converters (decoded response -> public result), as free functions both twins share."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Final, TypeVar

import numpy as np

from tensorwire.errors import InternalError, InvalidArgumentError
from tensorwire.programs import Program, leaves
from tensorwire.types import (
    GradResult,
    Inputs,
    ProgramResult,
    RemoteGradResult,
    ref_name,
)
from tensorwire.v1 import tensorwire_pb2 as pb
from tensorwire.wire.codec import Encoder, Handle, Received, Ref, as_handle

R = TypeVar("R")
T = TypeVar("T")
#: Makes the twin's remote tensor (RemoteTensor or AsyncRemoteTensor) of a handle.
Remote = Callable[[Handle], R]

#: Optimizer hyperparameters by their torch names, as ``Client.trainer`` takes them.
OPTIMIZER_OPTIONS: Final = (
    "lr",
    "momentum",
    "dampening",
    "weight_decay",
    "nesterov",
    "betas",
    "eps",
    "amsgrad",
)

# ---------------------------------------------------------------------- arguments


def tensor_value(value: Any) -> np.ndarray | Handle:
    """An array to send, or the Handle of a remote tensor (sent as a handle)."""
    handle = as_handle(value)
    return np.asarray(value) if handle is None else handle


def named_inputs(inputs: Inputs) -> list[tuple[str, np.ndarray | Handle]]:
    """A model's inputs as (name, tensor) pairs; "" names one bound by position."""
    if isinstance(inputs, np.ndarray):
        return [("", inputs)]
    if isinstance(inputs, Mapping):
        return [(str(name), tensor_value(value)) for name, value in inputs.items()]
    if isinstance(inputs, Sequence) and not isinstance(inputs, str | bytes):
        return [("", tensor_value(value)) for value in inputs]
    return [("", tensor_value(inputs))]


def remote_values(value: Any) -> Iterator[Any]:
    """Every remote tensor (anything with a Handle) in ``value``, through tuples,
    lists and mapping values."""
    return (leaf for leaf in leaves(value) if as_handle(leaf) is not None)


def checked_version(version: int) -> int:
    """``version`` checked before sending, as the codec checks tensors: a whole number
    from 0 (the newest, or every version, as the method says) to the int64 limit."""
    if (
        isinstance(version, bool)
        or not isinstance(version, int | np.integer)
        or not 0 <= version < 1 << 63
    ):
        raise InvalidArgumentError(f"version must be a whole number, 0 or more, not {version!r}")
    return int(version)


def _names(wrt: str | Sequence[str] | None) -> list[str]:
    """A model's ``wrt``: input names, checked before sending."""
    if wrt is None:
        return []
    names: list[Any] = [wrt] if isinstance(wrt, str) or not isinstance(wrt, Sequence) else [*wrt]
    for name in names:
        if not isinstance(name, str):
            raise InvalidArgumentError(
                f"wrt names a model's inputs by name (wrt='input' or wrt=['x', 'y']), not "
                f"{name!r}; Info lists each model's inputs. For a function's arguments by "
                "position, use call_grad(function, ..., wrt=0)"
            )
    return names


def _grad_outputs(
    encoder: Encoder[pb.GradRequest], grad_outputs: np.ndarray | Mapping[str, Any] | None
) -> None:
    request = encoder.message
    if grad_outputs is None:
        return
    if not isinstance(grad_outputs, Mapping):
        # One array: the vector for the single output, whatever the server names it.
        encoder.named(request.grad_outputs.add(), "", tensor_value(grad_outputs))
        return
    for name, value in grad_outputs.items():
        encoder.named(request.grad_outputs.add(), str(name), tensor_value(value))


def _arguments(
    encoder: Encoder[Any],
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    request: Any = None,
    where: str = "",
) -> None:
    """Encode Call arguments into ``request`` (default: the encoder's message)."""
    request = encoder.message if request is None else request
    for i, arg in enumerate(args):
        encoder.value(request.args.add(), arg, f"{where}argument {i}")
    for key, arg in kwargs.items():
        encoder.value(request.kwargs[key], arg, f"{where}argument {key!r}")


def _inputs(encoder: Encoder[Any], inputs: Inputs) -> None:
    for name, arr in named_inputs(inputs):
        encoder.named(encoder.message.inputs.add(), name, arr)


# ---------------------------------------------------------------------- requests


def info_request() -> Encoder[pb.InfoRequest]:
    return Encoder(pb.InfoRequest())


def infer_request(
    model: str, inputs: Inputs, outputs: Sequence[str] | None, version: int, keep: bool
) -> Encoder[pb.InferRequest]:
    request = pb.InferRequest(model=model)
    # Only the fields given: each keyword protobuf takes costs, even a default.
    version = checked_version(version)
    if version:
        request.version = version
    if outputs:
        request.outputs.extend(outputs)
    if keep:
        request.keep = keep
    encoder = Encoder(request)
    _inputs(encoder, inputs)
    return encoder


def grad_request(
    model: str,
    inputs: Inputs,
    wrt: str | Sequence[str] | None,
    grad_outputs: np.ndarray | Mapping[str, Any] | None,
    param_grads: bool,
    version: int,
    keep: bool,
) -> Encoder[pb.GradRequest]:
    request = pb.GradRequest(
        model=model,
        param_grads=param_grads,
        wrt=_names(wrt),
        model_version=checked_version(version),
        keep=keep,
    )
    encoder = Encoder(request)
    _inputs(encoder, inputs)
    _grad_outputs(encoder, grad_outputs)
    return encoder


def call_grad_request(
    function: str,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    wrt: int | Sequence[int],
    grad_outputs: np.ndarray | Mapping[str, Any] | None,
) -> Encoder[pb.GradRequest]:
    positions = [wrt] if isinstance(wrt, int | np.integer) else list(wrt)
    for position in positions:
        if isinstance(position, bool) or not isinstance(position, int | np.integer):
            raise InvalidArgumentError(
                f"call_grad's wrt gives positional arguments by position (wrt=0 or "
                f"wrt=[0, 1]), not {position!r}"
            )
    encoder = Encoder(pb.GradRequest(function=function, wrt=[str(int(i)) for i in positions]))
    _arguments(encoder, args, kwargs)
    _grad_outputs(encoder, grad_outputs)
    return encoder


def call_request(
    function: str, args: Sequence[Any], kwargs: Mapping[str, Any], keep: bool
) -> Encoder[pb.CallRequest]:
    encoder = Encoder(pb.CallRequest(function=function, keep=keep))
    _arguments(encoder, args, kwargs)
    return encoder


def model_statistics_request(model: str, version: int) -> Encoder[pb.ModelStatisticsRequest]:
    return Encoder(pb.ModelStatisticsRequest(model=model, version=checked_version(version)))


def load_request(model: str) -> Encoder[pb.LoadRequest]:
    return Encoder(pb.LoadRequest(model=model))


def unload_request(model: str, version: int) -> Encoder[pb.UnloadRequest]:
    return Encoder(pb.UnloadRequest(model=model, version=checked_version(version)))


def describe_session_request() -> Encoder[pb.DescribeSessionRequest]:
    return Encoder(pb.DescribeSessionRequest())


def put_request(value: Any) -> Encoder[pb.PutRequest]:
    encoder = Encoder(pb.PutRequest())
    encoder.tensor(encoder.message.tensor, tensor_value(value))
    return encoder


def get_request(handle: Handle) -> Encoder[pb.GetRequest]:
    return Encoder(pb.GetRequest(handle=handle.id))


def free_request(ids: Sequence[str]) -> Encoder[pb.FreeRequest]:
    return Encoder(pb.FreeRequest(handles=list(ids)))


def run_request(
    program: Program,
    inputs: Mapping[str, Any],
    outputs: Sequence[Ref | str] | None,
    loss: Ref | str | None,
    wrt: Ref | str | Sequence[Ref | str] | None,
    keep: bool,
    kept: Sequence[Ref | str] = (),
) -> Encoder[pb.RunRequest]:
    program.check_inputs(inputs)
    if isinstance(wrt, Ref | str):
        wrt = [wrt]
    request = pb.RunRequest(
        outputs=[ref_name(r) for r in outputs or ()],
        loss="" if loss is None else ref_name(loss),
        wrt=[ref_name(r) for r in wrt or ()],
        keep=keep,
        kept=[ref_name(r) for r in kept],
    )
    encoder = Encoder(request)
    for name, value in inputs.items():
        encoder.named(request.inputs.add(), name, tensor_value(value))
    for step in program.calls:
        out = request.steps.add(name=step.name, version=checked_version(step.version))
        if step.model:
            out.model = step.model
        else:
            out.function = step.function
        _arguments(encoder, step.args, step.kwargs, out, f"step {step.name!r} ")
    return encoder


def trainer_request(
    model: str,
    version: int,
    optimizer: str,
    options: Mapping[str, Any],
    loss: str,
    loss_options: Mapping[str, Any] | None,
) -> Encoder[pb.CreateTrainerRequest]:
    request = pb.CreateTrainerRequest(model=model, version=checked_version(version), loss=loss)
    request.optimizer.name = optimizer
    encoder = Encoder(request)
    for key, value in options.items():
        if value is not None:
            encoder.value(request.optimizer.options[key], value, f"option {key!r}")
    for key, value in (loss_options or {}).items():
        encoder.value(request.loss_options[key], value, f"loss option {key!r}")
    return encoder


def step_request(
    trainer: str, inputs: Inputs, target: Any, output: str | None
) -> Encoder[pb.StepRequest]:
    encoder = Encoder(pb.StepRequest(trainer=trainer, output=output or ""))
    _inputs(encoder, inputs)
    encoder.tensor(encoder.message.target, tensor_value(target))
    return encoder


def parameters_request(trainer: str) -> Encoder[pb.ParametersRequest]:
    return Encoder(pb.ParametersRequest(trainer=trainer))


# ---------------------------------------------------------------------- results


def owned(received: Received[Any], tensors: Sequence[pb.NamedTensor]) -> dict[str, np.ndarray]:
    """A response's arrays by name, each the caller's own."""
    arrays = received.named(tensors, "output")
    if received.owned:  # private, writable buffers (a stream's, a lane answer's)
        # Only an unaligned view is copied: an aligned array is what NumPy and torch
        # expect (a lane answer's payloads sit wherever the frame put them).
        return {name: view if view.flags.aligned else np.array(view) for name, view in arrays}
    # One copy: the received bytes are gRPC's and immutable; the caller gets its own.
    return {name: np.array(view) for name, view in arrays}


def handles(
    received: Received[Any], tensors: Iterable[tuple[str, pb.Tensor]]
) -> list[tuple[str, Handle]]:
    """The handles a response holds for results kept on the server."""
    found = []
    for name, tensor in tensors:
        handle = received.array(tensor, name)
        if not isinstance(handle, Handle):
            raise InternalError(
                f"{name}: the server answered data where a handle was asked for (keep)"
            )
        found.append((name, handle))
    return found


def kept(
    received: Received[Any], tensors: Sequence[pb.NamedTensor], remote: Remote[R]
) -> dict[str, R]:
    """The ``remote`` tensors of the handles a response's NamedTensors name, by name:
    results the server kept (``keep=True``)."""
    named = ((nt.name or str(i), nt.tensor) for i, nt in enumerate(tensors))
    return {name: remote(handle) for name, handle in handles(received, named)}


def results(
    received: Received[Any],
    tensors: Sequence[pb.NamedTensor],
    keep: bool,
    remote: Remote[R] | None,
) -> dict[str, np.ndarray] | dict[str, R]:
    """A response's NamedTensors by name: arrays of the caller's own, or with ``keep``
    the ``remote`` tensors of the handles the server kept."""
    if not keep:
        return owned(received, tensors)
    assert remote is not None, "results kept on the server need a maker of remote tensors"
    return kept(received, tensors, remote)


def grad_result(
    received: Received[pb.GradResponse], keep: bool, remote: Remote[R] | None
) -> GradResult | RemoteGradResult[R]:
    m = received.message
    if not keep:
        return GradResult(
            outputs=owned(received, m.outputs),
            grads=owned(received, m.grads),
            param_grads=owned(received, m.param_grads),
        )
    assert remote is not None, "results kept on the server need a maker of remote tensors"
    return RemoteGradResult(
        outputs=kept(received, m.outputs, remote),
        grads=kept(received, m.grads, remote),
        param_grads=kept(received, m.param_grads, remote),
    )


def one_or_all(values: Iterable[T]) -> T | tuple[T, ...]:
    """One value alone, or several as a tuple (Call's results)."""
    items = tuple(values)
    return items[0] if len(items) == 1 else items


def program_result(
    received: Received[pb.RunResponse], keep: bool, remote: Remote[R] | None
) -> ProgramResult[np.ndarray] | ProgramResult[R]:
    m = received.message
    outputs: dict[str, Any] = results(received, m.outputs, keep, remote)
    grads: dict[str, Any] = results(received, m.grads, keep, remote)
    if not m.kept:
        return ProgramResult(outputs, grads)
    assert remote is not None, "results kept on the server need a maker of remote tensors"
    return ProgramResult(outputs, grads, kept(received, m.kept, remote))


def put_handle(received: Received[pb.PutResponse]) -> Handle:
    return handles(received, [("tensor", received.message.tensor)])[0][1]


def get_array(received: Received[pb.GetResponse]) -> np.ndarray:
    arr = received.array(received.message.tensor, "tensor")
    if not isinstance(arr, np.ndarray):
        raise InternalError("Get answered a handle instead of the tensor's data")
    # A stream's buffer is private; gRPC's bytes are not: then one copy.
    return arr if received.owned else np.array(arr)
