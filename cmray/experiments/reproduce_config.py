"""Typed configuration of the reproduction study (``pipelines/reproduce.py``,
``configs/reproduce_*.yaml``): the paper's Table 2 in miniature on the bundled digits.

A study names the data, the EDM teacher (trained here until its 35-NFE figure levels off), the
student rows (named bundles of settings over one student base config, run as one Ray Tune grid)
and how every row is scored. Everything is checked before Ray starts: each row's settings are
validated against the student base config, with the teacher's path standing in for
``{teacher}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cmray.config import ConfigError, param
from cmray.tracking.config import TrackingConfig
from cmray.tune.config import VariantConfig

TEACHER_PLACEHOLDER = "{teacher}"
# The teacher's training steps, once its rule has stopped it: a row set to it sees the teacher's
# own budget of images (the teacher-free rows trained from scratch).
TEACHER_STEPS_PLACEHOLDER = "{teacher_steps}"


@dataclass
class StudyDataConfig:
    """The real images: prepared as shards once (kept for every later study)."""

    source: str = param("digits", help="a prepare_data source (digits: the bundled images)")
    resolution: int = param(16, help="R: images are R x R", ge=8)
    manifest: str = param("runs/data/digits16", help="where the shards and manifest go")


@dataclass
class StudyTeacherConfig:
    """The EDM teacher, trained in segments until its 35-NFE figure stops improving."""

    config: str = param("configs/digits_edm.yaml", help="the teacher's training config")
    set: list[str] = param(default_factory=list, help="KEY=VALUE settings applied to it")
    segment_steps: int = param(250, help="steps between two measurements of the figure", ge=1)
    max_steps: int = param(4000, help="stop here even if the figure still improves", ge=1)
    tolerance: float = param(
        0.05,
        help="converged once the last quarter of training improved the figure by less than this",
        gt=0,
        lt=1,
    )
    points: int = param(18, help="Karras points of the Heun sampler measured (18: 35 NFE)", ge=2)

    def __post_init__(self) -> None:
        if self.max_steps < 4 * self.segment_steps:
            raise ConfigError(
                f"teacher.max_steps = {self.max_steps} is below 4 segments of "
                f"{self.segment_steps}; the convergence test compares 3/4 of a run with its end",
                key="teacher.max_steps",
            )


@dataclass
class StudyStudentsConfig:
    """The rows: each a named bundle of settings over one base config, all one Tune grid."""

    config: str = param("configs/digits_ct.yaml", help="the student base config")
    set: list[str] = param(
        default_factory=list, help="KEY=VALUE settings for every row (the shared budget)"
    )
    rows: list[VariantConfig] = param(
        default_factory=list,
        help=f"name and settings of each row; {TEACHER_PLACEHOLDER} = the teacher, "
        f"{TEACHER_STEPS_PLACEHOLDER} = its training steps",
    )
    concurrent: int = param(0, help="rows trained at once (0: as many as the cluster holds)", ge=0)
    max_failures: int = param(1, help="times a failed row is retried, resuming its run", ge=0)


@dataclass
class StudyEvalConfig:
    """How every row and the teacher are scored: same samples, same noise, same statistics."""

    features: Literal["digits", "fashion", "inception"] = param(
        "digits",
        help="digits, fashion: the shipped classifiers (fd_digits, fd_fashion); inception: FID",
    )
    num_samples: int = param(1000, help="samples per sampler and draw", ge=2)
    draws: int = param(
        1,
        help="draws of noise (the ring: and of reference points) each figure is the mean of; "
        "the teacher's convergence rule reads the same means",
        ge=1,
    )
    search_samples: int = param(500, help="samples per candidate of the ternary search", ge=2)
    ref_count: int = param(1797, help="real images in the reference statistics", ge=2)
    pr_count: int = param(1000, help="features per side for precision/recall", ge=4)
    batch_size: int = param(250, help="images per task", ge=1)
    teacher_points: list[int] = param(
        default_factory=lambda: [1, 2, 4, 18],
        help="Heun sampler points scored for the teacher (n points = 2n - 1 NFE)",
    )
    workers: int = param(0, help="Ray actors that sample and score (0: one per CPU)", ge=-1)
    seed: int = param(0, help="the noise every row is sampled from")

    def __post_init__(self) -> None:
        if any(p < 1 for p in self.teacher_points) or not self.teacher_points:
            raise ConfigError(
                f"eval.teacher_points = {self.teacher_points}: give counts >= 1",
                key="eval.teacher_points",
            )


@dataclass
class RingStudyConfig:
    """The 2D ring suite: the same rows on the tutorial's ring, scored by energy distance."""

    config: str = param("configs/toy2d.yaml", help="the 2D experiment's config (teacher, rows)")
    set: list[str] = param(default_factory=list, help="KEY=VALUE settings applied to it")
    teacher_max_epochs: int = param(
        1200, help="double the teacher's epochs until it levels off, at most to this", ge=1
    )
    heun_points: list[int] = param(
        default_factory=lambda: [1, 2, 4, 18],
        help="Heun sampler points scored for the teacher besides its own 99-step sampler",
    )
    grid: int = param(40, help="Karras grid points the two-step ternary search indexes", ge=3)
    cpus: float = param(1.0, help="CPUs a row's trial reserves", gt=0)


@dataclass
class ReproduceConfig:
    """A whole study: data, teacher, rows, scoring, where it lives and MLflow."""

    suite: Literal["digits", "fashion", "ring"] = param(
        "digits",
        help="digits: the bundled real images; fashion: Fashion-MNIST; ring: the 2D ring "
        "(energy distance)",
    )
    name: str = param("reproduce-digits", help="study name; the same name resumes the study")
    out: str = param("runs/reproduce/digits", help="the study's directory (local)")
    data: StudyDataConfig = param(default_factory=StudyDataConfig, help="the real images")
    teacher: StudyTeacherConfig = param(default_factory=StudyTeacherConfig, help="the teacher")
    students: StudyStudentsConfig = param(default_factory=StudyStudentsConfig, help="the rows")
    eval: StudyEvalConfig = param(default_factory=StudyEvalConfig, help="scoring")
    ring: RingStudyConfig = param(default_factory=RingStudyConfig, help="the ring suite")
    tracking: TrackingConfig = param(
        default_factory=TrackingConfig, help="MLflow: one parent run, a child per row"
    )

    def __post_init__(self) -> None:
        if not self.students.rows:
            raise ConfigError("students.rows is empty; give at least one row", key="students.rows")
        names = [r.name for r in self.students.rows]
        if len(set(names)) != len(names):
            raise ConfigError(f"students.rows: names {names} repeat", key="students.rows")
