"""The models by name: ``train.model`` -> a builder (the names themselves are :mod:`genrecls.core.config`'s)."""

from __future__ import annotations

from typing import Any, Callable

from genrecls.models.networks import (
    build_cnn2d,
    build_default,
    build_linear,
    build_tutorial,
)
from genrecls.models.transfer import build_musicnn_classifier

__all__ = ["MODELS", "build_model"]


def build_musicnn(input_shape: tuple[int, int], n_labels: int, *, learning_rate: float = 1e-3,
                  fine_tune: bool = False, **kwargs: Any):
    """The pretrained MSD musicnn backbone (its 945-d embedding) and a softmax head; see :mod:`genrecls.models.transfer`."""
    return build_musicnn_classifier(input_shape, n_labels, learning_rate=learning_rate, fine_tune=fine_tune, **kwargs)


#: the builders by name: the same names as :data:`genrecls.core.config.MODEL_PRESETS` (a test checks it)
MODELS: dict[str, Callable[..., Any]] = {"tutorial": build_tutorial, "default": build_default, "cnn2d": build_cnn2d,
                                         "linear": build_linear, "musicnn": build_musicnn}


def build_model(name: str, input_shape: tuple[int, int], n_labels: int, **kwargs: Any):
    """Build and compile a model by name (see :data:`MODELS`).

    Parameters
    ----------
    name : a key of :data:`MODELS` (``train.model``, checked when the configuration is validated)
    input_shape : (n_mels, n_frames)
    n_labels : number of output classes (>= 2)
    kwargs : ``mean``/``std`` (per mel band, from the training split), ``augment``, ``learning_rate``
    """
    if n_labels < 2:
        raise ValueError(f"a classifier needs at least 2 labels, got {n_labels}")
    return MODELS[name](tuple(int(v) for v in input_shape), int(n_labels), **kwargs)
