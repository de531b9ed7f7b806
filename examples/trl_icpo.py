"""ICPO inside TRL: GRPOConfig/GRPOTrainer -> ICPOConfig/ICPOTrainer, nothing else changes.
Runs on a CPU with the bundled tiny model: python examples/trl_icpo.py (needs icpo[trl])."""
from datasets import Dataset
from transformers import AutoTokenizer

from icpo.data.templates import build_prompt
from icpo.integrations.trl import ICPOConfig, ICPOTrainer
from icpo.models import resolve_model_path
from icpo.rewards.verifiable import compute_score
from icpo.tasks.arithmetic import make_records

model = resolve_model_path("icpo/tiny")  # or any Hugging Face causal LM
tok = AutoTokenizer.from_pretrained(model, padding_side="left")
recs = make_records("train", 256)
data = Dataset.from_dict({"prompt": [build_prompt(tok, r["prompt"]) for r in recs],
                          "answer": [r["reward_model"]["ground_truth"] for r in recs]})


def correct(completions, answer, **_):
    return [compute_score("icpo/arithmetic", c, a)["score"] for c, a in zip(completions, answer)]


args = ICPOConfig(output_dir="outputs/trl_icpo", use_cpu=True, num_generations=8,
                  per_device_train_batch_size=32, max_completion_length=64, max_steps=20,
                  learning_rate=1e-4, icpo_delta=0.5, icpo_tau=2.0, omega_schedule="warmup_decay",
                  omega_max=1.0, report_to="none")
ICPOTrainer(model=model, reward_funcs=correct, args=args, train_dataset=data,
            processing_class=tok).train()
