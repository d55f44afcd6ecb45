"""Which training precision actually runs: ``precision`` (a stage's fp32 | bf16 | fp16) resolved for the device.

- CUDA: bf16 and fp16 autocast as asked (fp16 with a GradScaler); bf16 on a GPU without it (before Ampere) falls back
  to fp16 with the reason logged.
- CPU: bf16 autocast where the CPU computes bf16 natively (AVX-512 BF16 or AMX, as oneDNN uses them: about 2x on
  convolutions on a Sapphire Rapids Xeon); elsewhere bf16 would be emulated and slower than fp32, so the run falls back
  to fp32 and says why. fp16 autocast is a GPU setting: fp32 on CPU, with the reason.

One CPU bf16 exception, measured on torch 2.14.1 (oneDNN, a Xeon with AMX): the weight gradient of a convolution
(not depthwise) whose kernel is wider than 1 with a horizontal stride of 2 or more, reading a feature map one pixel
wide, comes back with garbage in the taps that only see padding (relative errors of 1e28 or more, nan and inf, different
from run to run: memory the kernel never wrote). ImageNet-shaped networks on small images reach such maps (timm's
resnet10t on 8x8 images: its stride-2 ``layer3`` and ``layer4`` convolutions; its loss went nan in 2 of 2 CI runs).
``strided_convs_on_one_pixel`` finds them with one dry forward, and the trainer then trains in fp32, saying why.

The resolved precision is what the trainer uses, what the stage result records (``info.precision``) and what the log
says, so a CPU run's record never claims a precision it did not train in.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

import torch
from torch import nn

log = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class ResolvedPrecision:
    requested: Precision
    precision: Precision
    """What trains."""
    reason: str
    """Why ``precision`` differs from ``requested`` ("" when it does not)."""

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)


@cache
def cpu_bf16() -> tuple[bool, str]:
    """Whether this CPU computes bf16 natively, and the instruction set that does it (or why not)."""
    probes = (("AMX", "_is_amx_tile_supported"), ("AVX-512 BF16", "_is_avx512_bf16_supported"))
    found = []
    for name, probe in probes:
        fn = getattr(torch.cpu, probe, None)
        try:
            if fn is not None and fn():
                found.append(name)
        except Exception:  # a private torch probe that changed: fall back to the kernel's flags
            found = []
            break
    if not found:
        flags = _cpuinfo_flags()
        found = [name for name, flag in (("AMX", "amx_bf16"), ("AVX-512 BF16", "avx512_bf16")) if flag in flags]
    if found:
        return True, " and ".join(found)
    return False, "no native bf16 on this CPU (neither AVX-512 BF16 nor AMX): bf16 would be emulated, slower than fp32"


def _cpuinfo_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def resolve_precision(requested: Precision, device: torch.device) -> ResolvedPrecision:
    """The precision that trains on ``device`` for a stage asking for ``requested`` (see the module docstring)."""
    if requested == "fp32":
        return ResolvedPrecision(requested, "fp32", "")
    if device.type == "cuda":
        if requested == "bf16" and not torch.cuda.is_bf16_supported():
            return ResolvedPrecision(requested, "fp16", f"{torch.cuda.get_device_name(device)} has no bf16: fp16")
        return ResolvedPrecision(requested, requested, "")
    if device.type == "cpu" and requested == "bf16":
        native, why = cpu_bf16()
        if native:
            return ResolvedPrecision(requested, "bf16", "")
        return ResolvedPrecision(requested, "fp32", why)
    return ResolvedPrecision(requested, "fp32", f"{requested} autocast is for GPUs; {device.type} trains in fp32")


def strided_convs_on_one_pixel(networks: Mapping[str, nn.Module], input_shape: tuple[int, ...]) -> list[str]:
    """The trainable convolutions of ``networks`` whose CPU bf16 weight gradient is wrong (see the module docstring):
    not depthwise, kernel wider than 1, horizontal stride >= 2, input one pixel wide, found by one no-grad forward of
    an image of ``input_shape`` (C, H, W) in eval mode (modes restored); module names, prefixed with the network's
    name where there are several. A network whose forward fails on a plain image batch is skipped (logged)."""
    found: list[str] = []
    for net_name, net in networks.items():
        hooks = []
        for name, m in net.named_modules():
            if (
                isinstance(m, nn.Conv2d)
                and m.groups != m.in_channels
                and m.kernel_size[1] > 1
                and m.stride[1] >= 2
                and m.weight.requires_grad
            ):
                label = ".".join(filter(None, (net_name if len(networks) > 1 else "", name))) or net_name

                def check(module: nn.Module, args: tuple[torch.Tensor, ...], label: str = label) -> None:
                    if args and args[0].shape[-1] == 1 and label not in found:
                        found.append(label)

                hooks.append(m.register_forward_pre_hook(check))
        if not hooks:
            continue
        modes = {m: m.training for m in net.modules()}
        device = next((p.device for p in net.parameters()), torch.device("cpu"))
        try:
            net.eval()
            with torch.no_grad():
                net(torch.zeros(1, *input_shape, device=device))
        except Exception as exc:  # a network that needs more than images: not probed
            log.debug("precision probe of %s skipped: %s", net_name, exc)
        finally:
            for m, mode in modes.items():
                m.training = mode
            for h in hooks:
                h.remove()
    return found
