"""distributed_step: data-parallel ResNet-18 training with one core for every launcher.

    from distributed_step import TrainConfig, train
    summary = train(TrainConfig(data="synthetic", steps=10))
"""
from distributed_step.config import ConfigError, TrainConfig

__all__ = ["ConfigError", "TrainConfig", "train"]


def train(config: TrainConfig, **kwargs):
    """Run `distributed_step.train.train` (imported lazily: torch takes seconds to import)."""
    from distributed_step.train import train as _train

    return _train(config, **kwargs)
