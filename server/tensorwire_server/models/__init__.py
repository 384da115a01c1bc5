"""The models a server serves: their signatures, the built-ins, the files and factories
they load from, the repository of numbered versions, the registry of what is loaded on
which device, dynamic batching, and per-version statistics.

- ``model``: ``Model`` and its signature (``IOSpec``); the signature a ``forward`` tells.
- ``builtins``: the models every server serves unconfigured, and how each is served.
- ``config``: a model's ``model.toml`` (``ModelConfig``), read and checked (``ConfigError``).
- ``repository``: a repository's folders: its models, their versions, a version's file.
- ``loader``: the one way a model loads, for ``--model`` and a repository's versions
  alike: TorchScript, ``torch.export``, AOTInductor and safetensors files, and factories.
- ``aotinductor``: a model file's format told from its contents; AOTInductor packages
  and the signature they carry.
- ``compiled``: torch.compile in warm-up, AOTInductor packages placed on devices, the
  compile cache.
- ``registry``: what is served, version by version, on which devices.
- ``batching``: concurrent requests stacked into one forward pass.
- ``statistics``: what each version has done.

May import: ``device`` and the package root's shared modules.
"""
