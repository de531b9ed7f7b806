"""One rank of tests/test_vllm_multirank.py (run under ``torchrun --nproc_per_node 2``).

``engine OUT``: every rank builds its own vLLM engine (``external_launcher``) on the same
random-weight Qwen2 model, then checks against the HF model on that rank: greedy output,
log-probs after one optimizer step and a sync, and samples for its own prompts.

``trainer OUT ZERO STEPS``: the tiny preset with ``rollout.engine=vllm`` at that ZeRO stage
(or ``--engine hf``), trained STEPS steps; afterwards each rank's engine is compared with the
trained policy (log-probs, greedy output against the HF engine on the same module).

Each rank writes ``rank<r>.json`` to OUT; the test compares the ranks. The process ends with
``os._exit`` once both ranks are done, as the trainer's entry points end a launched process
(vLLM's exit handler would otherwise tear its groups down after the world group is gone).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as torch_dist


def main(out_dir: str) -> None:
    torch_dist.init_process_group("gloo")
    rank, world = torch_dist.get_rank(), torch_dist.get_world_size()
    torch.set_num_threads(1)
    out = Path(out_dir)
    sys.path.insert(0, str(Path(__file__).parent))
    from test_vllm_engine import (
        EOS,
        build_random_model,
        hf,
        hf_logprobs,
        train_one_step,
        vllm_logprobs,
    )

    from icpo.rollout import SamplingParams
    from icpo.rollout.vllm_engine import VLLMRolloutEngine

    model_dir = out / "model"
    if rank == 0:
        build_random_model("qwen2", model_dir)
    torch_dist.barrier()
    model = build_random_model("qwen2", out / f"scratch{rank}")  # the same weights (seed 0)
    t0 = time.perf_counter()
    eng = VLLMRolloutEngine(str(model_dir), eos_token_ids=[EOS], dtype="float32",
                            max_model_len=256, seed=0, enforce_eager=True)
    start_s = time.perf_counter() - t0
    backend = eng.llm.llm_engine.vllm_config.parallel_config.distributed_executor_backend
    # each rank its own prompts
    prompts = [[5 + 50 * rank + i, 17, 33 + rank, 8] for i in range(4)]
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=16)
    ours = eng.generate(prompts, greedy).response_ids
    ref = hf(model).generate(prompts, greedy).response_ids
    # one optimizer step on the same data on every rank (as a data-parallel update leaves
    # them), then the sync
    prompt, continuation = [5, 17, 33, 8, 90], [11, 250, 3, 77, 400, 12, 9, 31]
    before = hf_logprobs(model, prompt, continuation)
    train_one_step(model, prompt, continuation)
    after = hf_logprobs(model, prompt, continuation)
    stale = vllm_logprobs(eng, prompt, continuation)
    t0 = time.perf_counter()
    eng.sleep()
    eng.sync_from(model, 0)
    sync_s = time.perf_counter() - t0
    synced = vllm_logprobs(eng, prompt, continuation)
    ours_after = eng.generate(prompts, greedy).response_ids
    ref_after = hf(model).generate(prompts, greedy).response_ids
    sampled = eng.generate(prompts, SamplingParams(n=4, temperature=1.0, max_new_tokens=16,
                                                   seed=11)).response_ids
    result = dict(rank=rank, world=world, backend=backend, engine_start_s=start_s,
                  sync_s=sync_s, greedy=ours, greedy_hf=ref, greedy_after=ours_after,
                  greedy_hf_after=ref_after, sampled=sampled, prompts=prompts,
                  step_moved=float((after - before).abs().max()),
                  stale_gap=float((stale - after).abs().max()),
                  synced_gap=float((synced - after).abs().max()))
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    torch_dist.barrier()


PROBE = ([5, 17, 33, 8, 90], [11, 25, 3, 77, 40, 12, 9, 31])  # ids under the tiny vocab


def trainer_main(out_dir: str, zero: int, steps: int, engine: str = "vllm") -> None:
    from icpo.config import load_config
    from icpo.rollout import HFRolloutEngine, SamplingParams
    from icpo.rollout.base import unwrap_model
    from icpo.tasks.arithmetic import make_records, write_jsonl
    from icpo.trainer import Trainer

    repo = Path(__file__).resolve().parents[1]
    out = Path(out_dir)
    rank = int(os.environ.get("RANK", "0"))
    data = out / "data"
    if rank == 0:  # every rank writes the same bytes; one is enough
        data.mkdir(parents=True, exist_ok=True)
        write_jsonl(make_records("train", 16 * (steps + 1)), data / "train.jsonl")
        write_jsonl(make_records("val", 64), data / "val.jsonl")
    else:
        while not (data / "val.jsonl").exists():
            time.sleep(0.5)
        time.sleep(1.0)
    overrides = [f"rollout.engine={engine}", f"trainer.zero_stage={zero}",
                 f"data.train_files=[{data / 'train.jsonl'}]",
                 f"data.val_files=[{data / 'val.jsonl'}]", f"trainer.total_steps={steps}",
                 "trainer.train_batch_size=16", "actor.ppo_mini_batch_size=16",
                 f"trainer.eval_every={steps}", "trainer.save_every=0",
                 f"trainer.output_dir={out / 'run'}", "trainer.progress_bar=false",
                 "trainer.tensorboard=false"]
    cfg = load_config(str(repo / "examples" / "configs" / "tiny_cpu.yaml"), overrides)
    trainer = Trainer(cfg)
    torch.set_num_threads(1)
    history = trainer.train()
    rank, world = torch_dist.get_rank(), torch_dist.get_world_size()
    model = unwrap_model(trainer.models.actor.module)
    model.eval()
    sys.path.insert(0, str(Path(__file__).parent))
    from test_vllm_engine import hf_logprobs, vllm_logprobs

    result = dict(rank=rank, world=world, zero=zero, engine=engine, history=history)
    prompts = [list(p) for p in _rank_prompts(trainer, rank)]
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=24)
    ref = HFRolloutEngine(model, trainer.tokenizer, zero_stage=zero).generate(prompts, greedy)
    result["greedy_hf"] = ref.response_ids
    prompt, continuation = PROBE
    with torch.no_grad():  # a collective forward under ZeRO-3: both ranks run it
        result["hf_logprobs"] = hf_logprobs(model, prompt, continuation).tolist()
    if engine == "vllm":
        eng = trainer.rollout
        result["backend"] = (eng.llm.llm_engine.vllm_config.parallel_config
                             .distributed_executor_backend)
        result["greedy"] = eng.generate(prompts, greedy).response_ids
        result["vllm_logprobs"] = vllm_logprobs(eng, prompt, continuation).tolist()
        result["sampled"] = eng.generate(prompts, SamplingParams(
            n=4, temperature=1.0, max_new_tokens=24, seed=11 + rank)).response_ids
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    torch_dist.barrier()


def _rank_prompts(trainer, rank: int) -> list[list[int]]:
    """Four held-out prompts of this rank's own (rank r takes items 4r..4r+3), tokenized as
    the trainer tokenizes them."""
    items = trainer.val_data.items[4 * rank:4 * rank + 4]
    return [list(item.prompt_ids) for item in items]


if __name__ == "__main__":
    if sys.argv[1] == "engine":
        main(sys.argv[2])
    else:
        trainer_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]),
                     sys.argv[5] if len(sys.argv) > 5 else "vllm")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
