"""One-step unrolled hypergradients for a loss-weighting controller ω (used by ``fusion_ratio``).

Setting: an inner loss L(θ, ω) of the student weights θ whose per-sample weights α come from a controller ω and from
the student's *detached* logits, a virtual SGD step ``θ' = θ − η·∇_θ L(θ, ω)``, and an outer loss
``L_val(θ') = CE(f_θ'(x_v), y_v)`` with no direct dependence on ω. Its gradient is
``∇_ω L_val(θ') = −η · ∇²_{ω,θ} L(θ, ω) · v`` with ``v = ∇_θ' L_val(θ')``.

- :func:`exact_hypergradient` builds θ' with ``create_graph=True`` and differentiates through it: second order, so
  every student op on the path to θ' needs a double backward.
- :func:`finite_difference_hypergradient` replaces the mixed second derivative by a central difference along v
  (Liu et al., DARTS, ICLR 2019, eq. 7/8): ``−η · [∇_ω L(θ + εv, ω) − ∇_ω L(θ − εv, ω)] / (2ε)``, ε = 0.01 / ‖v‖.
  Only first-order gradients are taken, and the two perturbed forwards need no graph through the student.
- :func:`double_backward_error` probes whether the exact path works for a student.

The inner loss is given as ``inner_loss(z, z_ref)``: the loss of student logits z, with α computed from ``z_ref``
(detached). The exact path calls it with ``z_ref = z``; the finite difference keeps ``z_ref`` at θ, because α's
input S is detached in the inner loss, so ∇_θ L (and hence the mixed derivative) treats α as constant in θ.

Every student forward runs through ``torch.func.functional_call`` on parameter dicts and on *cloned* buffers, with
autocast off, so neither the student's weights nor its BatchNorm statistics (nor any ``.grad``) are touched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

InnerLoss = Callable[[Tensor, Tensor], Tensor]
"""``inner_loss(z, z_ref)``: the scalar inner loss of student logits z, its weights α computed from ``z_ref``
(detached) and the controller, with the graph to the controller's parameters kept."""

FD_STEP = 0.01
"""DARTS' finite-difference step: ε·‖v‖ = 0.01, i.e. the perturbation θ ± εv has L2 norm 0.01 (weight units)."""


def widen(t: Tensor) -> Tensor:
    """At least fp32 (half-precision logits from autocast are widened; float64 stays float64)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _zeros_for_none(grads: Sequence[Tensor | None], like: Sequence[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(w) if g is None else g for w, g in zip(like, grads, strict=True)]


def _split(student: nn.Module, moved: set[str]) -> tuple[dict[str, Tensor], dict[str, Tensor], list[str]]:
    """(detached parameters, cloned buffers, names of the moved parameters in registration order)."""
    params = {n: p.detach() for n, p in student.named_parameters()}
    buffers = {n: b.clone() for n, b in student.named_buffers()}
    return params, buffers, [n for n in params if n in moved]


def exact_hypergradient(
    student: nn.Module,
    moved: set[str],
    inner_loss: InnerLoss,
    images: Tensor,
    val_images: Tensor,
    val_targets: Tensor,
    lr: float,
    omega: Sequence[Tensor],
) -> tuple[Tensor, list[Tensor]]:
    """(L_val(θ'), dL_val/dω) by differentiating through ``θ' = θ − lr·∇_θ L`` (``create_graph=True``).

    ``moved`` names the parameters in θ' (the rest are constants). Cost: two forwards, a backward with graph and a
    double backward through the student (about 4× a KD step on a CIFAR resnet8, see ``fusion_ratio``).
    """
    params, buffers, names = _split(student, moved)
    leaves = {n: (p.detach().requires_grad_() if n in moved else p) for n, p in params.items()}
    with torch.autocast(images.device.type, enabled=False), torch.enable_grad():
        z_s = functional_call(student, (leaves, buffers), (images,))
        inner = inner_loss(z_s, z_s)
        grads = torch.autograd.grad(inner, [leaves[n] for n in names], create_graph=True, allow_unused=True)
        virtual = dict(leaves)
        for name, g in zip(names, grads, strict=True):
            if g is not None:
                virtual[name] = leaves[name] - lr * g
        z_v = functional_call(student, (virtual, buffers), (val_images,))
        outer = F.cross_entropy(widen(z_v), val_targets)
        g_omega = torch.autograd.grad(outer, list(omega), allow_unused=True)
    return outer.detach(), _zeros_for_none(g_omega, omega)


def finite_difference_hypergradient(
    student: nn.Module,
    moved: set[str],
    inner_loss: InnerLoss,
    images: Tensor,
    val_images: Tensor,
    val_targets: Tensor,
    lr: float,
    omega: Sequence[Tensor],
) -> tuple[Tensor, list[Tensor]]:
    """(L_val(θ'), dL_val/dω) with the mixed second derivative replaced by DARTS' central difference along v.

    Cost: a forward and a first-order backward at θ (for θ') and at θ' (for v), two forwards without graph at θ ± εv
    and a backward through the controller only; no double backward, so any student that trains works.
    """
    params, buffers, names = _split(student, moved)
    with torch.autocast(images.device.type, enabled=False), torch.enable_grad():
        leaves = {n: (p.detach().requires_grad_() if n in moved else p) for n, p in params.items()}
        z_s = functional_call(student, (leaves, buffers), (images,))
        z_ref = z_s.detach()
        # α does not depend on θ in the gradient (S is detached), so only θ's leaves are asked for here.
        grads = torch.autograd.grad(inner_loss(z_s, z_ref), [leaves[n] for n in names], allow_unused=True)
        virtual = dict(params)
        for name, g in zip(names, grads, strict=True):
            virtual[name] = (params[name] if g is None else params[name] - lr * g).detach().requires_grad_()
        z_v = functional_call(student, (virtual, buffers), (val_images,))
        outer = F.cross_entropy(widen(z_v), val_targets)
        at_virtual = [virtual[n] for n in names]
        v = _zeros_for_none(torch.autograd.grad(outer, at_virtual, allow_unused=True), at_virtual)
        # ‖v‖ stays a tensor (no host sync). With v = 0 the perturbation is 0 and the scale below ≈ 0: a zero result.
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in v])) if v else None
        if norm is None:
            return outer.detach(), [torch.zeros_like(w) for w in omega]
        eps = FD_STEP / norm.clamp_min(torch.finfo(norm.dtype).tiny)
        with torch.no_grad():
            plus, minus = dict(params), dict(params)
            for name, g in zip(names, v, strict=True):
                plus[name], minus[name] = params[name] + eps * g, params[name] - eps * g
            z_plus = functional_call(student, (plus, buffers), (images,))
            z_minus = functional_call(student, (minus, buffers), (images,))
        # Only α(z_ref; ω) carries a graph, so the grad is ∇_ω L(θ + εv) − ∇_ω L(θ − εv); autograd adds the two
        # per-sample weights of α ((KD_i − CE_i)/B at θ + εv and at θ − εv) before the one backward through ω.
        diff = inner_loss(z_plus, z_ref) - inner_loss(z_minus, z_ref)
        g_omega = _zeros_for_none(torch.autograd.grad(diff, list(omega), allow_unused=True), omega)
    scale = -lr / (2.0 * eps)  # = −η·‖v‖ / (2·FD_STEP): 1/(2ε) of the central difference, −η of θ' = θ − η·g
    return outer.detach(), [(scale * g).to(g.dtype) for g in g_omega]


@contextmanager
def _training_mode(module: nn.Module) -> Iterator[None]:
    """``module.train()`` for the block, then every submodule's own mode back."""
    modes = [(m, m.training) for m in module.modules()]
    module.train()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def double_backward_error(student: nn.Module, moved: set[str], images: Tensor, targets: Tensor) -> str | None:
    """None if the exact hypergradient works for ``student``, else the error that its double backward raises.

    The probe mirrors :func:`exact_hypergradient` on a few real samples: per-sample weights w (standing in for α)
    scale a CE, ``g = ∇_θ`` of it with ``create_graph=True`` over the ``moved`` parameters, then ``∂(g·sg(g))/∂w``,
    which runs the same double-backward nodes as ``∂L_val(θ − η·g)/∂ω`` (the path from θ' back to α through the
    student's backward graph). It runs in train mode (as the meta step does: e.g. timm's gradient checkpointing is
    train-only) on cloned buffers under a forked RNG, so it changes no state. Forward or first-order failures are
    real bugs and propagate; only the double backward's ``RuntimeError`` (the type PyTorch raises for "derivative
    for ... is not implemented" and ``once_differentiable``) counts as "unsupported".
    """
    params, buffers, names = _split(student, moved)
    if not names:
        return None
    if images.shape[0] < 2:  # train-mode BatchNorm on a 1×1 map needs two samples
        images, targets = torch.cat([images, images.flip(-1)]), torch.cat([targets, targets])
    device = images.device
    fork = [] if device.type == "cpu" else [device]
    with (
        torch.random.fork_rng(devices=fork, device_type=device.type if fork else None),
        _training_mode(student),
        torch.autocast(device.type, enabled=False),
        torch.enable_grad(),
    ):
        leaves = {n: (p.detach().requires_grad_() if n in moved else p) for n, p in params.items()}
        z = functional_call(student, (leaves, buffers), (images,))
        weights = torch.full((z.shape[0],), 0.5, dtype=widen(z).dtype, device=device, requires_grad=True)
        loss = (weights * F.cross_entropy(widen(z), targets, reduction="none")).mean()
        grads = torch.autograd.grad(loss, [leaves[n] for n in names], create_graph=True, allow_unused=True)
        pairing = sum((g * g.detach()).sum() for g in grads if g is not None)
        if not isinstance(pairing, Tensor) or not pairing.requires_grad:
            return None  # no gradient reaches the moved parameters: nothing to differentiate twice
        try:
            torch.autograd.grad(pairing, weights, allow_unused=True)
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError as error:
            return str(error).splitlines()[0]
    return None
