"""NumPy <-> torch at the device edge: the only place arrays become tensors and back."""

from __future__ import annotations

import warnings
from typing import Final

import ml_dtypes
import numpy as np
import torch

from tensorwire.errors import FailedPreconditionError, InvalidArgumentError
from tensorwire_server.device.staging import PINNED_LIMIT, staged

# Request payloads are read-only views of the received bytes, handed to torch without a
# copy. Nothing writes to them (inputs are copied to the device, or used under
# inference_mode / as autograd leaves), so torch's warning about that is noise.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

_BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; otherwise ``cpu``, ``cuda``, ``cuda:N``."""
    if spec == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {spec!r}; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r} asked for but CUDA is not available")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {spec!r}: only {torch.cuda.device_count()} GPUs visible")
        device = torch.device("cuda", index)
    return device


def from_numpy(arr: np.ndarray) -> torch.Tensor:
    """A CPU tensor sharing ``arr``'s memory (bfloat16 through an int16 view)."""
    if not arr.flags.aligned:
        # A payload at an odd offset in the message; torch kernels expect alignment.
        arr = arr.copy()
    if arr.dtype == _BFLOAT16:
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)


def to_device(arr: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """``arr`` as a tensor on ``device``: no copy on the CPU; on CUDA, the copy a
    streamed request already made (staging), else staged through pinned memory so the
    host-to-device copy runs asynchronously. A tensor (one a session holds) moves
    only if it is on another device."""
    if isinstance(arr, torch.Tensor):
        return arr.to(device)
    host = from_numpy(arr)
    if device.type != "cuda":
        return host
    on_device = staged(arr)
    if on_device is not None and on_device.device == device:
        return on_device.view(host.dtype).view(host.shape)
    if host.nbytes > PINNED_LIMIT:
        return host.to(device)
    # The caching host allocator keeps the pinned block alive until the copy finishes.
    pinned = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
    pinned.copy_(host)
    return pinned.to(device, non_blocking=True)


#: The most dimensions a NumPy array (and so a result) may have.
MAX_DIMS: Final = 64


def to_numpy(tensor: torch.Tensor, name: str) -> np.ndarray:
    """``tensor.detach().cpu().numpy()``, for every dtype that can travel; from a GPU
    into pinned memory, which copies at full bus speed. A tensor of more dimensions
    than an array can have (a client's reshape or index may make one) is refused
    before it is copied, not left to fail as a server error in NumPy."""
    if tensor.dim() > MAX_DIMS:
        raise InvalidArgumentError(
            f"output {name!r} has {tensor.dim()} dimensions; at most {MAX_DIMS} can travel"
        )
    if tensor.is_cpu and tensor.dtype != torch.bfloat16:
        # numpy(force=True) is detach().cpu().resolve_conj().resolve_neg().numpy() in
        # one call (torch documents it so): a few µs less of a small call's CPU.
        try:
            return tensor.numpy(force=True)
        except TypeError as exc:
            raise FailedPreconditionError(f"output {name!r}: {tensor.dtype} cannot travel") from exc
    host = _to_host(tensor.detach().resolve_conj().resolve_neg())
    if host.dtype == torch.bfloat16:
        return host.view(torch.int16).numpy().view(_BFLOAT16)
    try:
        return host.numpy()
    except TypeError as exc:
        raise FailedPreconditionError(f"output {name!r}: {host.dtype} cannot travel") from exc


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    if not tensor.is_cuda or tensor.nbytes > PINNED_LIMIT:
        return tensor.cpu()
    # The numpy array keeps the pinned block; it returns to torch's cache once the
    # response holding it is sent.
    pinned = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    pinned.copy_(tensor, non_blocking=True)
    torch.cuda.current_stream(tensor.device).synchronize()
    return pinned


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The NumPy dtype ``to_numpy`` gives a tensor of ``dtype``."""
    return to_numpy(torch.empty(0, dtype=dtype), str(dtype)).dtype


def dtype_name(tensor: torch.Tensor) -> str:
    """``tensor``'s dtype as tensorwire names it ("float32", "bfloat16", ...)."""
    return str(tensor.dtype).removeprefix("torch.")


def is_differentiable(tensor: torch.Tensor) -> bool:
    """Whether autograd can take a gradient with respect to ``tensor``."""
    return tensor.dtype.is_floating_point or tensor.dtype.is_complex
