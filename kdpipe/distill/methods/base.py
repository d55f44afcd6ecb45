"""The KD method interface every method implements, and the factory that builds one from its params."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Union

import torch
from pydantic import Field
from torch import Tensor, nn

from kdpipe.config import StrictModel
from kdpipe.distill.stats import EpochStats
from kdpipe.distill.step import OptimizerSpec, StepControl, plain_optimizers
from kdpipe.registry import METHODS

if TYPE_CHECKING:
    from kdpipe.data import Splits

TeacherRole = Literal["frozen", "joint", "none"]
"""What a method needs from the teacher stage: a trained teacher it keeps frozen ("frozen": kd, dkd, ...), a network
it trains together with the student, from the teacher stage's weights or its random initialisation ("joint": dml,
switokd), or nothing ("none": ce, ffsd)."""


Batch = tuple[Tensor, Tensor]


@dataclass
class MethodContext:
    """What a method may need beyond its params and networks, given by the distill stage.

    ``input_shape`` lets feature methods size their adapters with one dry forward. The batch sources are callables so
    a method that does not use them costs nothing: ``train_eval_batches()`` iterates the train split with eval
    transforms (no augmentation, fixed order), ``val_batch(k)`` returns the k-th batch of an endless, reshuffled-
    every-pass stream over the held-out validation split (eval transforms), a pure function of (seed, k) so a resumed
    run draws the same batches.
    """

    input_shape: tuple[int, int, int]
    num_classes: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    train_eval_batches: Callable[[], Iterator[Batch]] | None = None
    val_batch: Callable[[int], Batch] | None = None
    student_name: str = ""
    teacher_name: str = ""

    @classmethod
    def from_splits(
        cls,
        splits: Splits,
        *,
        batch_size: int,
        seed: int,
        device: torch.device | str = "cpu",
        student_name: str = "",
        teacher_name: str = "",
        workers: int = 0,
    ) -> MethodContext:
        """The context the distill stage gives a method: ``val_batch`` draws ``batch_size`` validation images in
        an order fixed by ``seed`` (reshuffled every pass), ``train_eval_batches`` runs over the train split (a
        streamed split is decoded by ``workers`` processes)."""
        from kdpipe.data import derive_seed
        from kdpipe.data.stream import make_loader

        device = torch.device(device)
        loader = partial(make_loader, mean=splits.mean, std=splits.std, device=device)
        train_eval = loader(splits.train, batch_size=256, train=False, workers=workers)

        def train_eval_batches() -> Iterator[Batch]:
            return iter(train_eval)

        val = splits.val if splits.val is not None and len(splits.val) > 0 else None
        val_loader = None
        if val is not None:
            seed_val = derive_seed(seed, "meta-val")
            val_loader = loader(val, batch_size=batch_size, train=True, augment="none", seed=seed_val, drop_last=False)

        def val_batch(k: int) -> Batch:
            if val_loader is None:
                raise ValueError("this method needs a validation split; set data.val_fraction > 0")
            epoch, step = divmod(k, len(val_loader))
            return val_loader.batch(epoch, step)

        return cls(
            input_shape=(splits.in_chans, splits.image_size, splits.image_size),
            num_classes=splits.num_classes,
            device=device,
            train_eval_batches=train_eval_batches,
            val_batch=val_batch,
            student_name=student_name,
            teacher_name=teacher_name,
        )


def linear_ramp(epoch: int, warmup_epochs: int) -> float:
    """Weight of a loss term that ramps up linearly over ``warmup_epochs``: ``min((epoch + 1) / warmup, 1)`` for the
    0-based ``epoch`` (the DKD/ReviewKD convention with 1-based epochs), 1 when there is no warm-up."""
    return 1.0 if warmup_epochs <= 0 else min((epoch + 1) / warmup_epochs, 1.0)


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
    provenance: ClassVar[str] = ""
    """Where the implementation departs from a published source as a whole, for the README and the model card: ""
    when it follows the paper (and its official code where there is one)."""
    needs_val_split: ClassVar[bool] = False
    """True for methods that learn from a held-out split (data.val_fraction must be > 0)."""
    manual_optimization: ClassVar[bool] = False
    """True for methods that step their own optimizers inside :meth:`training_step` (online methods: which network
    is updated depends on the batch). They declare them in :meth:`optimizer_specs` and call
    :meth:`backward_step`; the trainer then neither backpropagates nor steps."""

    def __init__(
        self,
        params: MethodParams,
        student: nn.Module,
        teacher: nn.Module | None = None,
        context: MethodContext | None = None,
    ) -> None:
        super().__init__()
        if self.teacher_role == "frozen" and teacher is None:
            raise ValueError(f"method {params.name!r} needs a teacher")
        if self.teacher_role == "joint" and teacher is None:
            raise ValueError(f"method {params.name!r} trains the teacher stage's network jointly; it needs one")
        self.params = params
        self.student = student
        self.context = context
        self.step_control = StepControl()
        """The trainer's side of a step (loss scaling, gradient averaging, the schedule); bound by the trainer."""
        # A plain attribute inside a tuple: not a registered submodule, so the teacher never enters
        # state_dict(), parameters() or the optimizer.
        self._teacher: tuple[nn.Module, ...] = ()
        if teacher is not None and self.teacher_role == "joint":
            # A jointly trained teacher is a network like the student: registered, trained and checkpointed.
            self.joint_teacher = teacher
        elif teacher is not None:
            teacher.eval().requires_grad_(False)
            self._teacher = (teacher,)
        self.epoch = 0
        self.epochs = 1

    def bind(self, control: StepControl) -> None:
        """Called by the trainer once, before training: from then on loss scaling, gradient averaging and the lr
        come from ``control``."""
        self.step_control = control

    @property
    def lr(self) -> float:
        """The student's current learning rate (the trainer's schedule; settable for a method used without one)."""
        return self.step_control.lr

    @lr.setter
    def lr(self, value: float) -> None:
        self.step_control.lr = value

    @classmethod
    def check_pair(cls, params: MethodParams, student: str, teacher: str | None) -> None:
        """Refuse, before any work, a student/teacher pair this method cannot handle: raise ``ValueError`` with a
        message that says what to change. Called by the distill stage's preflight with the model names."""

    def build_network(self, arch: str) -> nn.Module:
        """A fresh ``arch`` (timm or kdpipe model name) sized for the run's data: extra networks of online methods."""
        from kdpipe.models.factory import create_model

        ctx = self.require_context()
        return create_model(arch, num_classes=ctx.num_classes, in_chans=ctx.input_shape[0])

    def require_context(self) -> MethodContext:
        if self.context is None:
            raise ValueError(f"method {self.params.name!r} needs a MethodContext (input shape, data) to be built")
        return self.context

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
        """Called before each epoch (0-based); methods with warm-ups read ``self.epoch``/``self.epochs``. Starts the
        epoch of ``self.stats`` (an ``EpochStats``) when the method keeps one."""
        self.epoch, self.epochs = epoch, epochs
        stats = getattr(self, "stats", None)
        if isinstance(stats, EpochStats):
            stats.begin(epoch)

    def optimized_parameters(self) -> list[nn.Parameter]:
        """What the trainer's optimizer updates: every trainable parameter not declared in :meth:`optimizer_specs`."""
        owned = {id(p) for spec in self.optimizer_specs().values() for p in spec.params}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in owned]

    def optimizer_specs(self) -> dict[str, OptimizerSpec]:
        """The optimizers this method steps itself, declared by name (every network of an online method, a
        meta-learned controller): the trainer builds them with the stage's settings, schedules and checkpoints
        them, and hands them back in ``step_control.optimizers`` (see :meth:`optimizer`)."""
        return {}

    def own_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The built optimizers of :meth:`optimizer_specs`, by name (built plainly on first use without a trainer)."""
        control = self.step_control
        if not control.bound and not control.optimizers:
            control.optimizers = plain_optimizers(self.optimizer_specs(), control.lr)
        return control.optimizers

    def optimizer(self, name: str) -> torch.optim.Optimizer:
        """The optimizer declared as ``name`` in :meth:`optimizer_specs`."""
        return self.own_optimizers()[name]

    def networks(self) -> dict[str, nn.Module]:
        """Every network this method trains, by name; each is evaluated every epoch. ``deployed_network`` names
        the one :meth:`deployable` returns."""
        return {"student": self.student}

    deployed_network: str = "student"

    def network_arch(self, name: str) -> str:
        """Model name of network ``name`` (for reports and saved weights); "" when unknown."""
        ctx = self.context
        if ctx is None:
            return ""
        return ctx.teacher_name if name == "teacher" else ctx.student_name

    def backward_step(self, loss: Tensor, optimizer: torch.optim.Optimizer) -> None:
        """Backpropagate ``loss`` and step ``optimizer`` through the trainer's ``StepControl.apply`` (fp16 loss
        scaling, gradients averaged over data-parallel ranks)."""
        self.step_control.apply(loss, optimizer)

    def epoch_metrics(self) -> dict[str, float]:
        """Method statistics of the epoch just finished (logged with the epoch's metrics); reset in on_epoch_start."""
        return {}

    def teacher_logits(self, images: Tensor) -> Tensor:
        """Teacher forward under inference_mode; cloned out of inference mode so autograd may save it."""
        assert self.teacher is not None
        with torch.inference_mode():
            logits = self.teacher(images)
        return logits.clone()

    def teacher_features(self, taps: Any, images: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Teacher logits and tapped maps (``taps``: a :class:`kdpipe.distill.taps.Taps` on the teacher) under
        inference_mode, cloned so autograd may save them as targets."""
        with torch.inference_mode():
            logits, maps = taps(images)
        return logits.clone(), [m.clone() for m in maps]

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


def create_method(
    params: MethodParams, student: nn.Module, teacher: nn.Module | None, context: MethodContext | None = None
) -> KDMethod:
    """Build the registered method named by ``params.name``."""
    cls = METHODS.get(params.name)
    method: KDMethod = cls(params, student, teacher, context)
    return method
