"""Test-time flips in the bundle's evaluation (``eval_inferer``), the same rule as the runtime (runtime/tta.py).

With the 2D classification preset's ``tta_flips`` set (e.g. ``[[1]]``), validation during training, ``medtune
evaluate``, the internal test and the exported sidecar all use the flip-averaged probabilities, so the number
in the report is the number the deployed model gives. The output is ``log(mean softmax)`` over the identity and
each flip, and the preset's ``Activationsd(softmax)`` turns it back into the mean probability. The 3D
segmentation preset wraps its sliding window (``inferer``): each flipped volume is run by the same sliding window,
as the runtime does (runtime/tta.py ``volume_logits``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from monai.inferers import Inferer


class FlipInferer(Inferer):
    """``network(x)`` when ``flips`` is empty; else log of the mean softmax over ``x`` and its flipped copies.

    ``flips``: spatial-axis sets (0-based, as in the sidecar's ``tta.flips``). Outputs with spatial axes
    (segmentation) are flipped back before averaging. ``inferer``: how one view is run (e.g. a
    ``SlidingWindowInferer``); ``None``: ``network(view)``.
    """

    def __init__(self, flips: Sequence[Sequence[int]] | None = None, inferer: Inferer | None = None) -> None:
        super().__init__()
        self.flips = [tuple(int(a) for a in f) for f in (flips or [])]
        self.inferer = inferer

    def _run(self, x: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.inferer is None:
            return network(x, *args, **kwargs)
        return self.inferer(x, network, *args, **kwargs)

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self._run(inputs, network, *args, **kwargs)
        if not self.flips:
            return out
        logp = [torch.log_softmax(out, dim=1)]
        for axes in self.flips:
            dims = [2 + a for a in axes]
            y = self._run(torch.flip(inputs, dims=dims), network, *args, **kwargs)
            if y.ndim == inputs.ndim:
                y = torch.flip(y, dims=dims)
            logp.append(torch.log_softmax(y, dim=1))
        return torch.logsumexp(torch.stack(logp), dim=0) - math.log(len(logp))
