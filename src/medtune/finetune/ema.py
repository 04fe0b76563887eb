"""Exponential moving average (EMA) of the weights, switched by the bundle key ``ema_decay`` (0 = off).

Built on ``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn`` (buffers averaged too, so
BatchNorm statistics follow the averaged weights). The handler is listed first in ``train#handlers``:

- every iteration: update the average;
- at the end of each epoch, *before* the ``ValidationHandler``: put the averaged weights into the network,
  so validation, ``model.pt`` (best model) and everything exported from it use the EMA weights;
- at the end of each epoch, *after* every other handler (registered when the run starts, so it is last):
  put the raw training weights back and training continues on them.

``checkpoint_last.pt`` therefore holds the EMA weights; a resumed run restarts the average from them
(noted in docs: a small, documented approximation rather than a second checkpoint format).
"""

from __future__ import annotations

import copy

import torch
from ignite.engine import Engine, Events
from torch import nn


def _unwrap(network: nn.Module) -> nn.Module:
    inner = getattr(network, "module", network)  # DDP / DataParallel wrap the network as .module
    return inner if isinstance(inner, nn.Module) else network


class EmaHandler:
    """Keep an EMA of ``network``'s parameters and buffers; validate and save the EMA weights each epoch."""

    def __init__(self, network: nn.Module, decay: float = 0.0, start_iteration: int = 0):
        self.network = network
        self.decay = float(decay or 0.0)
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {decay}")
        self.start_iteration = int(start_iteration)
        self.ema: torch.optim.swa_utils.AveragedModel | None = None
        self._raw: dict[str, torch.Tensor] | None = None

    @property
    def enabled(self) -> bool:
        return self.decay > 0.0

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._update)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._swap_in)

    def _started(self, engine: Engine) -> None:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        net = _unwrap(self.network)
        self.ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(self.decay), use_buffers=True)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._swap_back)  # after every other handler

    def _update(self, engine: Engine) -> None:
        if self.ema is not None and engine.state.iteration > self.start_iteration:
            self.ema.update_parameters(_unwrap(self.network))

    def _swap_in(self, engine: Engine) -> None:
        if self.ema is None:
            return
        net = _unwrap(self.network)
        self._raw = copy.deepcopy(net.state_dict())
        net.load_state_dict(self.ema.module.state_dict())

    def _swap_back(self, engine: Engine) -> None:
        if self._raw is not None:
            _unwrap(self.network).load_state_dict(self._raw)
            self._raw = None
