"""Stage pairing for stage swapping (iakd): which span of teacher stages may stand in for which span of student stages
when the two networks have different stage counts and strides.

[our default] Pair by stride. Every stage output has a nominal stride (``feature_info`` reduction, non-decreasing
along a network). A stride that both networks' stages reach is a common cut; at each one the cut falls after the LAST
stage of either network with that stride (consecutive stages at one stride refine one resolution and stay together).
Pair k is the student's stages between cut k−1 and cut k with the teacher's stages between the same cuts, so both
spans of a pair end on maps of the same stride. The first pair starts at the two stems, which may sit at different
strides (a CIFAR net's stem at 1, an ImageNet CNN's at 4; the adapter in front of the teacher span resizes), so
stages before the first common stride join the first pair. Student stages after the last common stride are the
tail: always the student's own (teacher stages there are never used). Two timm ImageNet CNNs (stages at 4, 8, 16, 32)
pair stage for stage; so do two CIFAR nets of one stride layout (1, 2, 4).

A pairing is usable when some swap still leaves a student stage in the hybrid network: two or more pairs, or one
pair and a tail. One pair and no tail would swap the whole trunk; it is refused with a message naming both stride
lists (CIFAR resnet8 at 1, 2, 4 vs timm resnet18 at 4, 8, 16, 32: one common stride, the student's last).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["StagePair", "pair_by_stride", "unpairable_message", "usable"]


@dataclass(frozen=True)
class StagePair:
    """Student stages ``student[0]..student[1]-1`` and teacher stages ``teacher[0]..teacher[1]-1`` (0-based,
    half-open), both ending at stride ``reduction``."""

    student: tuple[int, int]
    teacher: tuple[int, int]
    reduction: int


def _last_stage_at(reductions: Sequence[int]) -> dict[int, int]:
    return {r: i for i, r in enumerate(reductions)}  # later stages of one stride overwrite earlier ones


def pair_by_stride(student: Sequence[int], teacher: Sequence[int]) -> list[StagePair]:
    """The stage pairs of two networks whose stage outputs have the strides ``student`` and ``teacher``."""
    s_last, t_last = _last_stage_at(student), _last_stage_at(teacher)
    pairs = []
    s_start = t_start = 0
    for r in sorted(set(s_last) & set(t_last)):
        s_stop, t_stop = s_last[r] + 1, t_last[r] + 1
        pairs.append(StagePair((s_start, s_stop), (t_start, t_stop), r))
        s_start, t_start = s_stop, t_stop
    return pairs


def usable(pairs: Sequence[StagePair], n_student: int) -> bool:
    """True when some swap leaves a student stage in the hybrid (two pairs, or one pair and a student tail)."""
    return len(pairs) >= 2 or (len(pairs) == 1 and pairs[0].student[1] < n_student)


def unpairable_message(student: str, s_reductions: Sequence[int], teacher: str, t_reductions: Sequence[int]) -> str:
    """Why ``student`` and ``teacher`` cannot be paired, and what would work."""
    common = sorted(set(s_reductions) & set(t_reductions))
    shared = (
        "they share no stride"
        if not common
        else f"they share only stride {common[0]}, where the student's last stage ends"
    )
    return (
        f"iakd cannot pair student {student!r} with teacher {teacher!r}: it swaps spans of stages that end at a "
        f"stride both networks reach, and the student's stages end at strides {tuple(s_reductions)}, the teacher's "
        f"at {tuple(t_reductions)}; {shared}, so every swap would replace the whole student trunk. Pick a teacher "
        "whose stages end at two or more of the student's strides (a CIFAR net for a CIFAR student, an ImageNet "
        "timm CNN for an ImageNet timm student), or a logit method such as kd or dkd"
    )
