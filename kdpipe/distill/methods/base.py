"""The KD method interface every method implements, and the factory that builds one from its params."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Union

import torch
from pydantic import Field
from torch import Tensor, nn

from kdpipe.config import StrictModel
from kdpipe.registry import METHODS

TeacherRole = Literal["frozen", "none"]
"""What a method needs from the teacher stage: a trained frozen teacher, or nothing (plain CE)."""


class MethodParams(StrictModel):
    """Base of every method's params model; subclasses narrow ``name`` to a Literal of their registered name."""

    name: str


class KDMethod(nn.Module):
    """A knowledge-distillation method: owns the student, any training-only modules, and the loss.

    Offline methods receive a teacher that is frozen (eval mode, no gradients) and kept out of ``state_dict()``,
    ``parameters()`` and checkpoints. Simple methods implement :meth:`loss`; methods that change the training step
    override :meth:`training_step`. :meth:`deployable` is what gets exported: never a training-only head.
    """

    Params: ClassVar[type[MethodParams]]
    teacher_role: ClassVar[TeacherRole] = "frozen"

    def __init__(self, params: MethodParams, student: nn.Module, teacher: nn.Module | None = None) -> None:
        super().__init__()
        if self.teacher_role == "frozen" and teacher is None:
            raise ValueError(f"method {params.name!r} needs a teacher")
        self.params = params
        self.student = student
        # A plain attribute inside a tuple: not a registered submodule, so the teacher never enters
        # state_dict(), parameters() or the optimizer.
        self._teacher: tuple[nn.Module, ...] = ()
        if teacher is not None:
            teacher.eval().requires_grad_(False)
            self._teacher = (teacher,)
        self.epoch = 0
        self.epochs = 1

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher[0] if self._teacher else None

    def train(self, mode: bool = True) -> KDMethod:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # BN running statistics of a frozen teacher must never move
        return self

    def to(self, *args: Any, **kwargs: Any) -> KDMethod:
        super().to(*args, **kwargs)
        if self.teacher is not None:
            self.teacher.to(*args, **kwargs)
        return self

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        """Called before each epoch (0-based); methods with warm-ups read ``self.epoch``/``self.epochs``."""
        self.epoch, self.epochs = epoch, epochs

    def teacher_logits(self, images: Tensor) -> Tensor:
        """Teacher forward under inference_mode; cloned out of inference mode so autograd may save it."""
        assert self.teacher is not None
        with torch.inference_mode():
            logits = self.teacher(images)
        return logits.clone()

    def loss(self, student_out: Tensor, teacher_out: Tensor | None, targets: Tensor) -> dict[str, Tensor]:
        """Loss terms for one batch; key ``loss`` is optimised, the other keys are logged."""
        raise NotImplementedError

    def training_step(self, images: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """One forward pass; returns ``loss`` (to backpropagate), logged parts, and ``logits`` (detached)."""
        teacher_out = self.teacher_logits(images) if self.teacher is not None else None
        student_out = self.student(images)
        out = self.loss(student_out, teacher_out, targets)
        out["logits"] = student_out.detach()
        return out

    def deployable(self) -> nn.Module:
        """The plain student that gets exported."""
        return self.student


def method_params_union() -> Any:
    """Discriminated union (on ``name``) of every registered method's params model, for the distill stage config."""
    models = tuple(entry.obj.Params for entry in METHODS)
    return Annotated[Union[models], Field(discriminator="name")]  # noqa: UP007  (a runtime tuple of classes)


def create_method(params: MethodParams, student: nn.Module, teacher: nn.Module | None) -> KDMethod:
    """Build the registered method named by ``params.name``."""
    cls = METHODS.get(params.name)
    method: KDMethod = cls(params, student, teacher)
    return method
