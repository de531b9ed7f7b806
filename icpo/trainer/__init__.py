"""The GRPO/ICPO trainer: DeepSpeed engines, rollout orchestration, checkpoints and metrics."""

from icpo.trainer.trainer import Trainer

__all__ = ["Trainer"]
