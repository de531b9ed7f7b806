"""Using ICPO from other training frameworks: :mod:`icpo.integrations.trl` (TRL's GRPOTrainer).
Each submodule imports its framework, so import the one you need."""
