"""The server optimizers' rules per node and per entry in plain Python floats (float64): the reference."""

from __future__ import annotations

import math

import torch

from lightning_qmlhfl.optimizers.server import Average, FedAdagrad, FedAdam, FedAvgM, FedYogi


def server_step_by_hand(opt, node, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The new model of ``node`` (which keeps its state in ``node.server``) from v and Delta (flat vectors)."""
    if isinstance(opt, Average):
        return v + delta
    st = getattr(node, "server", None)
    if st is None:
        tau2 = getattr(opt, "tau", 0.0) ** 2
        st = node.server = {"m": [0.0] * v.numel(), "u": [tau2] * v.numel(), "t": 0}
    st["t"] += 1
    out = []
    for j, (vj, dj) in enumerate(zip(v.tolist(), delta.tolist())):
        if isinstance(opt, FedAvgM):
            st["m"][j] = opt.momentum * st["m"][j] + dj
            out.append(vj + opt.lr * st["m"][j])
            continue
        b1, b2 = opt.betas
        st["m"][j] = b1 * st["m"][j] + (1 - b1) * dj
        u = st["u"][j]
        if isinstance(opt, FedAdam):
            u = b2 * u + (1 - b2) * dj * dj
        elif isinstance(opt, FedYogi):
            s = dj * dj
            u = u - (1 - b2) * s * (1.0 if u > s else -1.0 if u < s else 0.0)
        elif isinstance(opt, FedAdagrad):
            u = u + dj * dj
        st["u"][j] = u
        m, uh = st["m"][j], u
        if opt.bias_correction:
            m = m / (1 - b1 ** st["t"])
            if not isinstance(opt, FedAdagrad):
                uh = u / (1 - b2 ** st["t"])
        out.append(vj + opt.lr * m / (math.sqrt(uh) + opt.tau))
    return torch.tensor(out, dtype=v.dtype)
