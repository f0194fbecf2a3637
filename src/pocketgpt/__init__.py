"""pocketgpt: train a small GPT from scratch on your own text, then sample, chat and evaluate.

Importing the package is cheap; torch loads on first use of load(), train() or prepare().
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["load", "train", "prepare", "TrainConfig", "PrepareConfig", "SamplingSettings",
           "build_train_config", "PocketError", "__version__"]

from .config import PrepareConfig, TrainConfig, build_train_config
from .errors import PocketError
from .sampling import SamplingSettings
from .version import __version__

if TYPE_CHECKING:
    from .corpus import prepare
    from .loading import load
    from .trainer import train


def __getattr__(name: str) -> Any:
    if name == "load":
        from .loading import load

        return load
    if name == "train":
        from .trainer import train

        return train
    if name == "prepare":
        from .corpus import prepare

        return prepare
    raise AttributeError(f"module 'pocketgpt' has no attribute {name!r}")
