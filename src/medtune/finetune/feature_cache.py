"""Frozen-encoder training with features computed once: the backbone runs once per image, the head every epoch.

With ``strategy: linear_probe`` the backbone is frozen (BatchNorm in eval mode), so its output for a given
preprocessed input never changes. :func:`enable_feature_cache` patches the network's ``forward`` (the module,
its ``state_dict`` and ``model.pt`` are untouched): for each sample of a batch the input of the head module is
looked up by the SHA-256 of the input tensor (data + preprocessing) in a cache file named after the SHA-256 of
the backbone's tensors (weights); a miss runs the backbone once (eval mode, no gradient) and stores it. A change
of the data, the preprocessing or the weights changes a key, so stale features are never used. The cache file
(``features-<weights hash>.pt``, a tensor dict read with ``weights_only=True``) is shared by every run that
points at the same ``feature_cache_dir`` (e.g. all arms of a ``medtune study``).

With ``strategy: last_stages`` the frozen *prefix* of the network is cached instead: when the first trained stage
is one top-level module (ResNet ``layer4``) and every module before it is frozen with fixed BatchNorm statistics,
the input of that module is cached (file named after the SHA-256 of the prefix's tensors), and the rest of the
network runs every step on it (the prefix modules are stood in for by ``nn.Identity`` for that call). The first
such call checks, once, that this equals the network's own forward (eval mode); if not (a forward that is not a
chain of its top-level modules) the run silently keeps the original forward.

Written by hand: MONAI's ``CacheDataset`` / ``PersistentDataset`` cache *transformed inputs*, not network
activations. Random augmentation would make every epoch's input new (a miss each time), so the 3D presets
turn augmentation off while the cache is on (``augment_prob``). Tracing / ONNX export and any run where the
backbone needs gradients use the original forward.
"""

from __future__ import annotations

import atexit
import hashlib
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from medtune.errors import MedTuneError
from medtune.weights import get_architecture

_FLUSH_EVERY = 32  # new entries between writes
_FLUSH_SECONDS = 30.0


def tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def backbone_sha256(model: nn.Module, head_prefixes: tuple[str, ...]) -> str:
    """SHA-256 over every non-head tensor of ``model`` (names, shapes, bytes), in state-dict order."""
    h = hashlib.sha256()
    for key, value in model.state_dict().items():
        if key.startswith(head_prefixes) or not isinstance(value, torch.Tensor):
            continue
        h.update(key.encode())
        h.update(tensor_sha256(value).encode())
    return h.hexdigest()


class FeatureCache:
    """Head inputs keyed by input hash, persisted to ``<cache_dir>/features-<weights hash>.pt``."""

    def __init__(self, cache_dir: str | Path, weights_hash: str):
        self.path = Path(cache_dir) / f"features-{weights_hash[:24]}.pt"
        self.entries: dict[str, torch.Tensor] = {}
        self.dirty = 0
        self.hits = 0
        self.misses = 0
        self._last_flush = time.time()
        if self.path.is_file():
            try:
                loaded = torch.load(self.path, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - a broken cache is a user-facing one-liner
                raise MedTuneError(f"unreadable feature cache ({type(exc).__name__}); delete it", self.path) from exc
            if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
                raise MedTuneError("feature cache does not hold a tensor dict; delete it", self.path)
            self.entries = dict(loaded)

    def get(self, key: str) -> torch.Tensor | None:
        return self.entries.get(key)

    def put(self, key: str, value: torch.Tensor) -> None:
        self.entries[key] = value.detach().cpu().clone()
        self.dirty += 1

    def maybe_flush(self, force: bool = False) -> None:
        """Write when asked, or after enough new entries or time."""
        if self.dirty and (force or self.dirty >= _FLUSH_EVERY or time.time() - self._last_flush > _FLUSH_SECONDS):
            self.flush()

    def flush(self) -> None:
        """Write the cache atomically if it changed (merging entries another process wrote meanwhile)."""
        if not self.dirty:
            return
        from medtune.atomic import write_with

        merged = dict(self.entries)
        if self.path.is_file():
            try:
                on_disk = torch.load(self.path, map_location="cpu", weights_only=True)
                merged = {**on_disk, **merged} if isinstance(on_disk, dict) else merged
            except Exception:  # noqa: BLE001 - replaced below by a good file
                pass
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_with(self.path, lambda tmp: torch.save(merged, tmp))
        self.entries = merged
        self.dirty = 0
        self._last_flush = time.time()


def _head_module(model: nn.Module, head_prefixes: tuple[str, ...]) -> nn.Module:
    """The single module under the architecture's head prefix (``fc.`` -> ``model.fc``)."""
    if len(head_prefixes) != 1:
        raise MedTuneError(f"feature caching needs one head module, the architecture has {list(head_prefixes)}")
    name = head_prefixes[0].rstrip(".")
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        raise MedTuneError(f"the network has no head module {name!r} for feature caching") from exc


class _StopForward(Exception):
    """Raised by a pre-hook once the frozen prefix's output is captured (the rest need not run)."""


_BN_OR_DROPOUT = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)


def prefix_sha256(model: nn.Module, prefix: list[str], boundary: str) -> str:
    """SHA-256 over the tensors of the top-level modules ``prefix`` and the name of the module they feed."""
    h = hashlib.sha256(f"prefix->{boundary}".encode())
    names = tuple(n + "." for n in prefix)
    for key, value in model.state_dict().items():
        if key.startswith(names) and isinstance(value, torch.Tensor):
            h.update(key.encode())
            h.update(tensor_sha256(value).encode())
    return h.hexdigest()


class _CachedForward:
    """The patched ``forward``: cached head inputs for a frozen backbone, the original forward otherwise."""

    def __init__(self, model: nn.Module, arch: str, cache_dir: str | Path):
        self.model = model
        self.original = model.forward
        self.head_prefixes = tuple(get_architecture(arch).head_prefixes)
        self.head = _head_module(model, self.head_prefixes)
        self.cache_dir = Path(cache_dir)
        self.cache: FeatureCache | None = None  # opened at the first cached forward: weights are final by then
        self.prefix_cache: FeatureCache | None = None  # last_stages: the frozen prefix's output
        self.prefix_ok: bool | None = None  # None: not checked yet against the original forward

    def _open(self) -> FeatureCache:
        if self.cache is None:
            self.cache = FeatureCache(self.cache_dir, backbone_sha256(self.model, self.head_prefixes))
            atexit.register(self.cache.flush)
        return self.cache

    def _backbone_features(self, x: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []
        handle = self.head.register_forward_pre_hook(lambda m, args: captured.append(args[0].detach()))
        was_training = self.model.training
        try:
            self.model.eval()  # deterministic: no dropout, BatchNorm running statistics
            with torch.no_grad():
                self.original(x)
        finally:
            handle.remove()
            self.model.train(was_training)
        return captured[-1]

    def _frozen_prefix(self) -> tuple[list[str], str] | None:
        """``(prefix module names, boundary name)`` when the network trains from a top-level module on and every
        module before it is frozen (no trainable parameter, no BatchNorm/dropout in training mode); else None."""
        prefix: list[str] = []
        for name, child in self.model.named_children():
            if any(p.requires_grad for p in child.parameters()):
                if not prefix or (name + ".").startswith(self.head_prefixes):
                    return None
                return prefix, name
            if any(isinstance(m, _BN_OR_DROPOUT) and m.training for m in child.modules()):
                return None
            prefix.append(name)
        return None

    def _prefix_features(self, x: torch.Tensor, boundary: str) -> torch.Tensor:
        captured: list[torch.Tensor] = []

        def stop(module: nn.Module, args: tuple) -> None:
            captured.append(args[0].detach())
            raise _StopForward

        handle = self.model.get_submodule(boundary).register_forward_pre_hook(stop)
        try:
            with torch.no_grad():
                self.original(x)
        except _StopForward:
            pass
        finally:
            handle.remove()
        if not captured:
            raise MedTuneError(f"the network's forward never reached {boundary!r}: cannot cache its frozen prefix")
        return captured[0]

    def _suffix(self, feats: torch.Tensor, prefix: list[str]) -> torch.Tensor:
        """The network's own forward with the prefix modules as identities, on the prefix's output."""
        modules = self.model._modules
        saved = {n: modules[n] for n in prefix}
        try:
            for n in prefix:
                modules[n] = nn.Identity()
            return self.original(feats)
        finally:
            modules.update(saved)

    def _cached(
        self, cache: FeatureCache, x: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        keys = [tensor_sha256(x[i]) for i in range(x.shape[0])]
        feats: list[torch.Tensor | None] = [cache.get(k) for k in keys]
        todo = [i for i, f in enumerate(feats) if f is None]
        cache.hits += len(keys) - len(todo)
        cache.misses += len(todo)
        if todo:
            computed = compute(x[todo])
            for j, i in enumerate(todo):
                feats[i] = computed[j]
                cache.put(keys[i], computed[j])
        # evaluation passes and the first all-cached batch (a new epoch) write what the last epoch added
        cache.maybe_flush(force=not self.model.training or not todo)
        return torch.stack([f for f in feats if f is not None]).to(x.device)

    def _prefix_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """last_stages: the trained part on the cached output of the frozen prefix; None when that does not apply."""
        found = self._frozen_prefix() if self.prefix_ok is not False else None
        if found is None:
            return None
        prefix, boundary = found
        if self.prefix_cache is None:
            self.prefix_cache = FeatureCache(self.cache_dir, prefix_sha256(self.model, prefix, boundary))
            atexit.register(self.prefix_cache.flush)
        if self.prefix_ok is None:  # once: the chain of top-level modules must be the network's forward
            was_training = self.model.training
            try:
                self.model.eval()
                with torch.no_grad():
                    reference = self.original(x[:2])
                    ours = self._suffix(self._prefix_features(x[:2], boundary), prefix)
                self.prefix_ok = ours.shape == reference.shape and torch.allclose(ours, reference, atol=1e-5, rtol=1e-4)
            finally:
                self.model.train(was_training)
            if not self.prefix_ok:
                return None
        feats = self._cached(self.prefix_cache, x, lambda t: self._prefix_features(t, boundary))
        return self._suffix(feats, prefix)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        exporting = torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()
        if exporting or not isinstance(x, torch.Tensor):
            return self.original(x)
        backbone_trains = any(
            p.requires_grad for n, p in self.model.named_parameters() if not n.startswith(self.head_prefixes)
        )
        if backbone_trains:
            out = self._prefix_forward(x)
            return self.original(x) if out is None else out
        return self.head(self._cached(self._open(), x, self._backbone_features))


def enable_feature_cache(model: nn.Module, arch: str, cache_dir: str | Path) -> _CachedForward:
    """Patch ``model.forward`` so a frozen backbone runs once per distinct input (see the module docstring).

    The cache file is chosen by the backbone's weights at the first cached forward (after any checkpoint load).
    """
    patched = _CachedForward(model, arch, cache_dir)
    model.forward = patched
    model.medtune_feature_cache = patched  # type: ignore[assignment]  # a plain attribute on the module (torch types it Tensor | Module)
    return patched


def cache_applies(arch: str, strategy: str, train_stages: int = 1) -> bool:
    """Whether the cache covers the frozen part of ``arch`` under ``strategy``: ``linear_probe`` (the backbone), or
    ``last_stages`` whose first trained stage is one top-level module (the frozen prefix: ResNet stem + layer1-3).

    The 3D preset turns augmentation off exactly when this holds (an augmented input would miss every time)."""
    if strategy == "linear_probe":
        return True
    if strategy != "last_stages":
        return False
    stages = get_architecture(arch).stages
    if not stages:
        return True  # the stages are the top-level children
    if not 1 <= int(train_stages) < len(stages):
        return False
    first = stages[-int(train_stages)]
    names = (first,) if isinstance(first, str) else tuple(first)
    return len(names) == 1 and names[0].endswith(".") and names[0].count(".") == 1


def maybe_cache_features(
    model: nn.Module, arch: str, strategy: str, enabled: bool, cache_dir: str | Path | None, train_stages: int = 1
) -> nn.Module:
    """Bundle glue: the network, with :func:`enable_feature_cache` applied when ``enabled`` and
    :func:`cache_applies`; returned unchanged otherwise."""
    if enabled and cache_applies(arch, strategy, train_stages):
        if not cache_dir:
            raise MedTuneError("feature_cache is on but feature_cache_dir is not set")
        enable_feature_cache(model, arch, cache_dir)
    return model


def default_cache_dir() -> str:
    """``$MEDTUNE_CACHE`` or ``~/.cache/medtune``, ``/features``."""
    import os

    root = os.environ.get("MEDTUNE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "medtune")
    return os.path.join(root, "features")
