"""Models: what one is (:class:`ModelConfig`), its file, and every source it is read from.

This package sits below training, evaluation, tracking and the CLI, and imports none of them:
they all read and write models through it. ``load_model(source, device)`` is the entry point.
"""

from cmray.models.build import build_model, parametrization
from cmray.models.checkpoints import IncompleteCheckpointError
from cmray.models.config import ModelConfig, NoiseConfig
from cmray.models.files import (
    MODEL_FORMAT,
    ModelSourceError,
    load_model,
    locate_model,
    read_model,
    register_resolver,
    write_model_file,
)

# Images per network call when sampling: a 256x256 ADM forward holds about 0.6 GiB per image.
MODEL_BATCH = 16

__all__ = [
    "MODEL_BATCH",
    "MODEL_FORMAT",
    "IncompleteCheckpointError",
    "ModelConfig",
    "ModelSourceError",
    "NoiseConfig",
    "build_model",
    "load_model",
    "locate_model",
    "parametrization",
    "read_model",
    "register_resolver",
    "write_model_file",
]
