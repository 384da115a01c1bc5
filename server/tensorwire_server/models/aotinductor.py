"""AOTInductor packages (``torch._inductor.aoti_compile_and_package``'s ``.pt2``): telling
a model file's format from its contents, loading a package (no compiler needed: it
holds compiled code) and the signature it carries.

A package says little of its inputs: how many there are (its call spec) and, when it
was made with ``package_metadata``, their names, dtypes and shapes under the
``tensorwire.inputs`` and ``tensorwire.outputs`` keys of its metadata. A model.toml's
``[[inputs]]`` say the rest. Packages come from the operator, never from a client.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree

from tensorwire_server.models.model import IOSpec

#: The metadata keys a package's signature is kept under (``package_metadata``).
INPUTS_KEY = "tensorwire.inputs"
OUTPUTS_KEY = "tensorwire.outputs"
#: Why Grad and training refuse a package.
INFERENCE_ONLY = (
    "it runs an AOTInductor package, compiled ahead of time for inference only (no "
    "autograd graph); serve its eager or torch.export form to take gradients or train"
)


def file_format(path: str | os.PathLike[str]) -> str:
    """What a model file holds, read from its contents: ``aotinductor`` (an
    AOTInductor package), ``export`` (a torch.export archive) or ``torchscript``. When
    the contents tell none of these, the extension decides (``.pt2``: export), so that
    the format's own loader says what is wrong with the file."""
    names: list[str] = []
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    if any("/data/aotinductor/" in f"/{n}" for n in names):
        return "aotinductor"
    if any(n.endswith(".json") and "/models/" in f"/{n}" for n in names):
        return "export"
    if any(n.endswith(("/data.pkl", "/constants.pkl")) for n in names):
        return "torchscript"
    return "export" if os.fspath(path).endswith(".pt2") else "torchscript"


class AOTInductorModule(nn.Module):
    """An AOTInductor package as a module: its compiled code runs the forward pass.
    It holds no parameters (its weights are inside the package) and copies share the
    loaded code, which is safe to call from many threads."""

    def __init__(self, path: str | os.PathLike[str], device_index: int = -1) -> None:
        super().__init__()
        self.path = os.fspath(path)
        self.runner = torch._inductor.aoti_load_package(self.path, device_index=device_index)
        self.metadata: dict[str, str] = dict(self.runner.get_metadata())
        #: "cpu" or "cuda": the device the package was compiled for.
        self.device_type = self.metadata.get("AOTI_DEVICE_KEY", "cpu")

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> Any:
        return self.runner(*args, **kwargs)

    def for_device(self, device: torch.device) -> AOTInductorModule:
        """This package loaded for ``device``; ValueError when it was compiled for a
        device of another type."""
        if device.type != self.device_type:
            raise ValueError(
                f"the AOTInductor package {self.path} was compiled for {self.device_type}, "
                f"so it cannot run on {device}; compile it for {device.type}"
            )
        if device.type != "cuda" or (device.index or 0) == 0:
            return self
        return AOTInductorModule(self.path, device.index or 0)

    def __deepcopy__(self, memo: dict[int, Any]) -> AOTInductorModule:
        return self  # the compiled code is shared; nothing in it is written


Signature = tuple[IOSpec, ...]


def read_package(path: str | os.PathLike[str]) -> tuple[AOTInductorModule, Signature, Signature]:
    """A package's module, its inputs and its outputs: from its ``tensorwire.*``
    metadata when present, else inputs named after their positions (``input0``, ...) or
    keywords as its call spec tells, and no outputs."""
    module = AOTInductorModule(path)
    metadata = module.metadata
    inputs = _specs(metadata[INPUTS_KEY]) if INPUTS_KEY in metadata else _call_spec_inputs(module)
    outputs = _specs(metadata[OUTPUTS_KEY]) if OUTPUTS_KEY in metadata else ()
    return module, inputs, outputs


def package_metadata(inputs: Sequence[IOSpec], outputs: Sequence[IOSpec] = ()) -> dict[str, str]:
    """The metadata that records a signature in a package: pass it as
    ``inductor_configs={"aot_inductor.metadata": package_metadata(...)}``."""
    made = {INPUTS_KEY: _specs_json(inputs)}
    if outputs:
        made[OUTPUTS_KEY] = _specs_json(outputs)
    return made


def _specs_json(specs: Sequence[IOSpec]) -> str:
    return json.dumps(
        [
            {"name": s.name, "dtype": s.dtype, "shape": None if s.shape is None else list(s.shape)}
            for s in specs
        ]
    )


def _specs(text: str) -> tuple[IOSpec, ...]:
    try:
        items = json.loads(text)
        return tuple(
            IOSpec(
                str(item["name"]),
                item.get("dtype"),
                None if item.get("shape") is None else tuple(int(d) for d in item["shape"]),
            )
            for item in items
        )
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"its signature metadata is malformed: {exc}") from exc


def _call_spec_inputs(module: AOTInductorModule) -> tuple[IOSpec, ...]:
    """Inputs from the package's call spec: ``(args, kwargs)``, positions then names."""
    in_spec = _pytree.treespec_loads(module.runner.loader.get_call_spec()[0])
    args, kwargs = in_spec.children()
    names = [f"input{i}" for i in range(args.num_children)]
    names += [str(k) for k in (kwargs.context or [])]
    return tuple(IOSpec(n) for n in names)
