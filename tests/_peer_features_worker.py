"""One rank of tests/test_trainer_peer_features.py's two-process run: trains with the config
named on the command line and writes what this rank saw to ``<output_dir>/rank<r>.json``: the
prompt sampler's final state and, per step, how many groups this rank trained on."""

import json
import sys
from pathlib import Path

from icpo.config import load_config
from icpo.trainer import Trainer

cfg = load_config(sys.argv[1])
trainer = Trainer(cfg)
local_groups = []
real_update = Trainer._update


def spy(self, scored, step):
    local_groups.append(len(scored.samples) // cfg.rollout.n)
    return real_update(self, scored, step)


Trainer._update = spy
trainer.train()
out = Path(cfg.trainer.output_dir) / f"rank{trainer.rank}.json"
out.write_text(json.dumps({"sampler": trainer.sampler.state_dict(), "groups": local_groups}))
trainer.close()
