"""Adam(W) fused where torch has it, and an optimiser's state restored from a checkpoint as it was built."""
from __future__ import annotations

from typing import Any, Dict, Sequence, Tuple

import torch
from torch import Tensor


def adam(params: Sequence[Any], *, lr: float, betas: Tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0,
         decoupled: bool = False) -> torch.optim.Optimizer:
    """Adam (AdamW with `decoupled` weight decay) over `params` (tensors or param groups), fused where it applies:
    one kernel for the whole update instead of a dozen foreach ops, the same update rule, an interchangeable
    state_dict."""
    params = list(params)  # a generator would be used up by the fused check
    opt_cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    kwargs = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    if _fused_adam_ok(params):
        try:
            return opt_cls(params, fused=True, **kwargs)
        except (RuntimeError, TypeError):  # an older torch without fused CPU kernels
            pass
    return opt_cls(params, **kwargs)


def _fused_adam_ok(params: Sequence[Any]) -> bool:
    """Whether fused Adam(W) applies: floating-point parameters (or param groups of them), all on one CPU or CUDA
    device."""
    params = [p for item in params for p in (item["params"] if isinstance(item, dict) else [item])]
    devices = {p.device for p in params}
    return (len(devices) == 1 and next(iter(devices)).type in ("cpu", "cuda")
            and all(p.is_floating_point() for p in params))


def load_optimizer(optimizer: torch.optim.Optimizer, state: Dict[str, Any]) -> None:
    """`optimizer.load_state_dict`, keeping the implementation it was built with (fused or not): the saved groups
    carry the flags of the run that saved them, e.g. no `fused` from checkpoints written before it was used.

    Each per-parameter state tensor (Adam's moments) takes its parameter's memory layout: a checkpoint saved with
    NCHW conv weights resumes into channels-last ones, and the fused kernels pair elements by position, not index.
    """
    flags = [{k: g.get(k) for k in ("fused", "foreach")} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, kept in zip(optimizer.param_groups, flags):
        group.update(kept)
        for p in group["params"]:
            st = optimizer.state.get(p, {})
            for k, v in st.items():
                if isinstance(v, Tensor) and v.shape == p.shape and v.stride() != p.stride():
                    st[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)
            if kept["fused"] and isinstance(st.get("step"), Tensor):
                # fused kernels want each step counter as a float tensor on the parameter's device
                st["step"] = st["step"].to(p.device, torch.float32)
