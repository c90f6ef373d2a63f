"""The student's optimizer: AdamW (fused / foreach / plain, chosen for the device it runs on), the
non-finite-step guard for plain fp32 engines, and the linear warm-up/decay schedule."""
from __future__ import annotations

from typing import Optional

import torch

from codir_ds.engine.ds_config import zero_stage
from codir_ds.errors import CodirError


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that skips a step whose gradients are not finite, and says so in ``overflow``.

    DeepSpeed's ZeRO, fp16 and bf16 optimizers already skip such steps; a plain fp32
    engine (ZeRO stage 0) calls the client optimizer directly and would write NaN into
    the weights. DeepSpeed reads ``overflow`` to count the step as skipped and to hold
    the LR schedule. Costs one host sync per optimizer step, so it is used only there.
    """

    overflow = False

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        self.overflow = bool(grads) and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
        if self.overflow:
            return None
        return super().step(closure)


def needs_nonfinite_guard(ds: dict) -> bool:
    """True when DeepSpeed would apply a step with non-finite gradients (fp32 without ZeRO)."""
    return (zero_stage(ds) == 0 and not ds.get("fp16", {}).get("enabled", False)
            and not ds.get("bf16", {}).get("enabled", False))


def fused_adamw_devices() -> list[str]:
    """Device types with torch's fused AdamW kernel (``cuda`` and, since torch 2.4, ``cpu``, ...)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
        return list(_get_fused_kernels_supported_devices())
    except ImportError:  # private torch API: be conservative
        return ["cuda"]


def run_device_type() -> str:
    """The device type this run trains on (DeepSpeed's accelerator: ``cuda``, ``cpu``, ...)."""
    from deepspeed.accelerator import get_accelerator
    return get_accelerator().device_name()


def resolve_optimizer_impl(impl: str, device_type: Optional[str] = None) -> str:
    """``training.optimizer_impl`` on ``device_type``: ``fused``, ``foreach`` or ``plain``.

    ``auto`` is fused where the device has the fused kernel, else foreach; ``fused`` where it
    has none is refused in one line (called by the start-up checks, before anything is written).
    """
    device_type = device_type or run_device_type()
    supported = device_type in fused_adamw_devices()
    if impl == "auto":
        return "fused" if supported else "foreach"
    if impl == "fused" and not supported:
        raise CodirError(f"training.optimizer_impl=fused: torch {torch.__version__} has no fused AdamW on "
                         f"'{device_type}' (only {', '.join(fused_adamw_devices())}): set "
                         f"training.optimizer_impl=auto, foreach or plain")
    if impl not in ("fused", "foreach", "plain"):
        raise CodirError(f"config key 'training.optimizer_impl' must be one of auto, fused, foreach, plain; got "
                         f"{impl!r}: fix it in the YAML or with --set training.optimizer_impl=...")
    return impl


def optimizer_flags(impl: str) -> dict:
    """AdamW's ``fused`` / ``foreach`` arguments for a resolved implementation."""
    return {"fused": {"fused": True, "foreach": False}, "foreach": {"fused": False, "foreach": True},
            "plain": {"fused": False, "foreach": False}}[impl]


def optimizer_and_schedule(module: torch.nn.Module, tcfg, total_steps: int, ds: Optional[dict] = None,
                           device_type: Optional[str] = None):
    """AdamW (no decay on biases/norms) and linear warm-up then linear decay to 0.

    ``ds``: the DeepSpeed config; where DeepSpeed itself would not skip non-finite steps
    the optimizer is :class:`GuardedAdamW`. The implementation (fused / foreach / plain) is
    ``training.optimizer_impl`` resolved for ``device_type`` (default: where the optimizer runs, see
    :func:`optimizer_device_type`).
    """
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "LayerNorm" in name or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    impl = resolve_optimizer_impl(getattr(tcfg, "optimizer_impl", "auto"), device_type or optimizer_device_type(ds))
    cls = GuardedAdamW if ds is not None and needs_nonfinite_guard(ds) else torch.optim.AdamW
    opt = cls(groups, lr=tcfg.lr, betas=tuple(tcfg.adam_betas), eps=tcfg.adam_eps, **optimizer_flags(impl))
    warmup = int(tcfg.warmup_ratio * total_steps)

    def linear(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, linear)


def optimizer_device_type(ds: Optional[dict] = None) -> str:
    """Where the optimizer's parameters live: the CPU under ZeRO optimizer offload, else the run's device."""
    offload = ((ds or {}).get("zero_optimization") or {}).get("offload_optimizer") or {}
    if str(offload.get("device", "none")).lower() not in ("none", ""):
        return "cpu"
    return run_device_type()


def check_optimizer_impl(tcfg, ds: dict) -> None:
    """Start-up check of ``training.optimizer_impl`` on the machine and the DeepSpeed JSON (the value checks are
    in the config's ``validate``). One-line error, nothing written."""
    resolve_optimizer_impl(tcfg.optimizer_impl, optimizer_device_type(ds))
