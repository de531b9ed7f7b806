"""Run configuration: dataclasses loaded from YAML plus dotted overrides, validated up front.

``schema.py`` holds the dataclasses (one per concern, a docstring per field) and the ``Literal``
names they allow; ``load.py`` reads, checks and saves configs; ``doc.py`` generates the reference
(``icpo train --help``, docs/config.md). Each imports only the ones before it, and none imports
torch. Import from here::

    from icpo.config import load_config
    cfg = load_config("run.yaml", ["actor.lr=1e-5"])
"""

from icpo.config.doc import field_docs
from icpo.config.load import config_from_dict, load_config, save_config, validate
from icpo.config.schema import (
    ActorConfig,
    AlgorithmConfig,
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    OmegaConfig,
    RewardConfig,
    RolloutConfig,
    TrainerConfig,
)

__all__ = [
    "ActorConfig", "AlgorithmConfig", "Config", "ConfigError", "DataConfig", "ModelConfig",
    "OmegaConfig", "RewardConfig", "RolloutConfig", "TrainerConfig", "config_from_dict",
    "field_docs", "load_config", "save_config", "validate",
]
