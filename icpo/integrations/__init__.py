"""Using ICPO from other training frameworks: :mod:`icpo.integrations.trl` (an ICPOTrainer for
TRL's GRPOTrainer users) and :mod:`icpo.integrations.verl` (an advantage estimator for verl).
Each submodule imports its framework, so import the one you need."""
