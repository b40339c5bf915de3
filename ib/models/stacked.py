"""S modules of one architecture as stacked tensors, run one member at a time inside `torch.func.vmap`: the
population of `ib.engine.population` (a sweep's runs) and of `ib.estimators.estimate.estimate_mi_population` (critics
trained together)."""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Sequence

from torch import Tensor, nn
from torch.func import functional_call, stack_module_state


class _Method(nn.Module):
    """Calls a method of the wrapped module through `forward`, so that `functional_call` can run any of them."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, method: str, *args: Any) -> Any:
        return getattr(self.module, method)(*args)


def per_member(t: Tensor) -> tuple:
    """The dimensions of a stacked tensor [S, ...] other than the population's (reductions over them need no copy,
    whatever the layout, where `reshape(S, -1)` would copy a transposed one)."""
    return tuple(range(1, t.dim())) if t.dim() > 1 else ()


class Stacked:
    """S modules of one architecture as stacked tensors, run through a weightless copy on the meta device.

    `leaves` are what the optimiser updates: each parameter stacked [S, ...], except that a weight matrix is held
    as its transpose [S, in, out], contiguous. `params` presents them as the modules' parameters (for a weight, the
    transposed view [S, out, in]). The batched products' backward produces a weight's gradient in exactly that
    transposed layout, so it reaches the contiguous leaf with no transposing copy (a strided copy, far slower than a
    plain one), and the optimiser's fused kernel runs on contiguous tensors instead of copying in and out."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        params, buffers = stack_module_state(list(modules))
        self.transposed = {f"module.{k}" for k, v in params.items() if v.dim() == 3}
        self.leaves: Dict[str, Tensor] = {
            f"module.{k}": (v.detach().transpose(1, 2).contiguous().requires_grad_(v.requires_grad)
                            if f"module.{k}" in self.transposed else v) for k, v in params.items()}
        self.buffers: Dict[str, Tensor] = {f"module.{k}": v for k, v in buffers.items()}
        self.skeleton = _Method(copy.deepcopy(modules[0]).to("meta"))
        self.training = modules[0].training
        self.skeleton.train(self.training)

    @property
    def params(self) -> Dict[str, Tensor]:
        """The stacked parameters as the modules name and shape them, [S, ...] (views of `leaves`)."""
        return {k: v.transpose(1, 2) if k in self.transposed else v for k, v in self.leaves.items()}

    def leaf_is_transposed(self) -> List[bool]:
        """For each leaf, in order, whether it holds its parameter transposed."""
        return [k in self.transposed for k in self.leaves]

    def call(self, params: Dict[str, Tensor], buffers: Dict[str, Tensor], method: str, *args: Any) -> Any:
        """`method` of one member (inside `vmap`), with that member's params and buffers."""
        return functional_call(self.skeleton, (params, buffers), (method, *args))

    def member_state(self, m: int) -> Dict[str, Tensor]:
        """Member m's `state_dict` entries (params and buffers), detached copies."""
        return {k[len("module."):]: v[m].detach().clone() for k, v in {**self.params, **self.buffers}.items()}
