"""Group ops: placeholder until the kernels land."""
from icpo.ops.reference import ICPOAdvantages
def preference_scores(confidence, group_size=None, *, group_offsets=None, delta=0.4):
    raise NotImplementedError
def icpo_advantages(confidence, rewards, group_size=None, *, group_offsets=None, delta=0.4, tau=2.0, omega=1.0, scale=True, unbiased=False, eps=1e-6):
    raise NotImplementedError
def grpo_advantages(rewards, group_size=None, *, group_offsets=None, scale=True, unbiased=False, eps=1e-6):
    raise NotImplementedError
