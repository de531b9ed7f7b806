"""``icpo data``, ``icpo train``, ``icpo eval``, ``icpo filter-coarse`` and ``icpo export``.

  icpo data make-arithmetic --out data/arithmetic   # the tiny task's train.jsonl / val.jsonl
  icpo train --config examples/configs/tiny_cpu.yaml data.train_files=[data/arithmetic/train.jsonl]
  icpo train --config outputs/run/config.yaml --resume   # newest checkpoint in trainer.output_dir
  icpo eval --model icpo/tiny --data data/arithmetic/val.jsonl --n 4 --temperature 1.0
  icpo filter-coarse --model icpo/tiny --data train.jsonl --out coarse.jsonl  # paper's coarse data
  icpo eval --model outputs/run/checkpoints/step_000010 --data val.jsonl  # LoRA: merged on load
  icpo export --merged --adapter outputs/run/checkpoints/step_000010 --out merged/  # LoRA -> HF

Config fields: ``icpo train --help`` or docs/config.md.
"""

from __future__ import annotations

# Only the standard library at module level: --help and argument errors must not wait for torch.
import argparse
import json
import re
import sys

from icpo.runtime import set_thread_env_defaults

INTERRUPTED = 130  # icpo.trainer.interrupt.EXIT_CODE, without importing torch here


def _train(args: argparse.Namespace) -> int:
    from icpo.config import load_config

    cfg = load_config(args.config, args.overrides)  # config errors before torch is imported
    from icpo.trainer import Trainer
    from icpo.trainer.distributed import exit_launched_process
    from icpo.trainer.interrupt import train_to_end
    from icpo.trainer.summary import print_summary

    trainer = Trainer(cfg, resume=args.resume, overwrite=args.overwrite)
    history, code = train_to_end(trainer)
    if code == 0 and trainer.rank == 0:
        print_summary(cfg, history)
    exit_launched_process(code)
    return code


def split_resume(args: argparse.Namespace) -> None:
    """``--resume a.b=c``: argparse takes the override as the checkpoint PATH (``--resume``'s
    value is optional). An argument holding '=' is an override, never a path."""
    if getattr(args, "resume", None) and "=" in args.resume and args.resume != "auto":
        args.overrides = [args.resume, *args.overrides]
        args.resume = "auto"


def _check_eval_args(args: argparse.Namespace) -> None:
    """Every value ``icpo eval`` takes, before torch or the model loads (one line, exit 2)."""
    from icpo.errors import check_range

    check_range("--n", args.n, at_least=1, integer=True)
    check_range("--temperature", args.temperature, at_least=0)
    for flag, value in (("--max-new-tokens", args.max_new_tokens),
                        ("--max-prompt-length", args.max_prompt_length),
                        ("--batch-size", args.batch_size)):
        check_range(flag, value, at_least=1, integer=True)
    check_range("--max-samples", args.max_samples, at_least=0, integer=True)
    check_range("--seed", args.seed, at_least=0, below=2**63, integer=True)
    if args.threads is not None:
        check_range("--threads", args.threads, at_least=1, integer=True)


def _eval(args: argparse.Namespace) -> int:
    _check_eval_args(args)
    from icpo.runtime import apply_num_threads

    apply_num_threads(args.threads)
    import torch
    from tqdm.auto import tqdm

    from icpo.config import DataConfig, RewardConfig, RolloutConfig
    from icpo.data import PromptDataset, load_records
    from icpo.models.loading import load_causal_lm, load_tokenizer, resolve_dtype
    from icpo.rewards import RewardFn
    from icpo.rollout.hf import HFRolloutEngine
    from icpo.trainer.evaluate import evaluate
    from icpo.trainer.preflight import check_model_path, check_reward_function

    adapter = _lora_adapter(args.model)  # a LoRA checkpoint: its base model + adapters
    if adapter is None:
        check_model_path("--model", args.model)  # before loading anything: one-line errors
    check_reward_function(args.reward, "--reward")
    records = [r for p in args.data for r in load_records(p)]  # data errors before the model
    if args.max_samples:
        records = records[: args.max_samples]
    reward_fn = RewardFn(RewardConfig(function=args.reward))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype("auto", device)
    if adapter is None:
        tokenizer = load_tokenizer(args.model)
        model = load_causal_lm(args.model, dtype, device)
    else:
        from icpo.models import lora

        model, base = lora.load_merged(adapter, dtype=dtype)
        tokenizer = load_tokenizer(lora.tokenizer_folder(adapter, base) or base)
        model = model.to(device)
    data_cfg = DataConfig(train_files=[], val_files=list(args.data),
                          max_prompt_length=args.max_prompt_length, template=args.template)
    dataset = PromptDataset(records, tokenizer, data_cfg)
    rollout_cfg = RolloutConfig(max_response_length=args.max_new_tokens, val_n=args.n,
                                val_temperature=args.temperature, hf_batch_size=args.batch_size)
    engine = HFRolloutEngine(model, tokenizer, batch_size=args.batch_size)
    with tqdm(total=len(dataset.items), desc="icpo eval", unit="prompt", dynamic_ncols=True,
              disable=args.no_progress) as bar:
        engine.on_batch = bar.update
        acc = evaluate(engine, tokenizer, dataset, reward_fn, rollout_cfg, seed=args.seed)
    print(json.dumps({"model": args.model, "data": args.data, "n": args.n,
                      "temperature": args.temperature, "num_prompts": len(dataset.items),
                      f"mean@{args.n}": acc}))
    return 0


def _lora_adapter(path: str):
    """The adapter folder when ``path`` is a LoRA checkpoint (``checkpoints/step_N`` or its
    ``model/``) or a PEFT adapter folder, its base model checked; else None."""
    from icpo.errors import UserError
    from icpo.models import lora

    try:
        adapter = lora.find_adapter_folder(path, "--model")
    except UserError:  # not an adapter: --model is checked as a model folder
        return None
    base = lora.adapter_base_model(adapter)
    if base is None:
        raise UserError(f"--model: the LoRA adapter in {adapter} records no base model; merge "
                        "it first with icpo export --adapter ... --model BASE")
    lora.check_base_model(base, "--model (the adapter's base_model_name_or_path)")
    return adapter


def _filter_coarse(args: argparse.Namespace) -> int:
    from icpo.data.coarse import CoarseFilterError, CoarseFilterSpec, filter_coarse

    spec = CoarseFilterSpec(
        model=args.model, train_files=list(args.data), output=args.out, n=args.n,
        temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=args.seed,
        reward_function=args.reward, answer_weight=args.answer_weight,
        format_weight=args.format_weight, prompt_key=args.prompt_key, answer_key=args.answer_key,
        template=args.template, max_prompt_length=args.max_prompt_length,
        batch_size=args.batch_size, summary=args.summary, overwrite=args.overwrite)
    try:
        summary = filter_coarse(spec)
    except CoarseFilterError as e:  # a bad argument, named in the message
        print(f"icpo filter-coarse: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary[k] for k in ("output", "judged", "kept", "all_correct",
                                               "all_wrong", "dropped_mixed", "kept_fraction")}))
    return 0


def _export(args: argparse.Namespace) -> int:
    from icpo.errors import UserError
    from icpo.models import lora  # its checks import no torch

    adapter = lora.find_adapter_folder(args.adapter, "--adapter")
    lora.check_export_out(args.out, args.overwrite, "--out")
    base, flag = args.model, "--model"
    if base is None:
        base, flag = lora.adapter_base_model(adapter), "--adapter's base_model_name_or_path"
        if base is None:
            raise UserError(f"--adapter: {adapter} records no base model; pass --model")
    base = lora.check_base_model(base, flag)
    dtype = None if args.dtype == "auto" else args.dtype
    out = lora.export_merged(base, adapter, args.out, dtype=dtype, overwrite=args.overwrite)
    print(json.dumps({"model": base, "adapter": str(adapter), "out": str(out)}))
    return 0


def _make_arithmetic(args: argparse.Namespace) -> int:
    from icpo.errors import check_new_files, check_range
    from icpo.tasks.arithmetic import make_records, write_jsonl

    splits = [("train", args.train), ("val", args.val), ("test", args.test)]
    for split, n in splits:
        check_range(f"--{split}", n, at_least=0, integer=True)
    splits = [(s, n) for s, n in splits if n]
    # Every check before the first write: a refused command leaves the folder as it was.
    paths = check_new_files(args.out, [f"{s}.jsonl" for s, _ in splits],
                            overwrite=args.overwrite)
    for (split, n), path in zip(splits, paths):
        write_jsonl(make_records(split, n), path)
        print(f"wrote {n} {split} problems to {path}")
    return 0


def _train_help() -> str:
    from icpo.config.doc import help_text

    return plain(help_text())


def plain(text: str) -> str:
    """reST markup as a terminal shows it: ``x`` and :func:`x` become 'x'."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"'\1'", text)
    return re.sub(r"``(.+?)``", r"'\1'", text)


def build_parser() -> argparse.ArgumentParser:
    from icpo import __version__

    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="icpo", description=plain(__doc__), formatter_class=raw)
    parser.add_argument("--version", action="version", version=f"icpo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train with GRPO or ICPO", formatter_class=raw,
                           description="Train with GRPO or ICPO. Ctrl-C (exit 130) and SIGTERM "
                           "(exit 143) save a checkpoint of the last finished step; a second run "
                           "into a folder in use is refused.", epilog=_train_help())
    train.add_argument("--config", help="YAML config (defaults apply to what it leaves out)")
    train.add_argument("--resume", nargs="?", const="auto", default=None,
                       help="continue from the newest checkpoint in trainer.output_dir, "
                       "or from PATH")
    train.add_argument("--overwrite", action="store_true",
                       help="replace the run already in trainer.output_dir (refused otherwise)")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. actor.lr=1e-6")
    train.set_defaults(fn=_train)

    ev = sub.add_parser("eval", help="mean@k accuracy of a model on a prompt set")
    ev.add_argument("--model", required=True, help="Hugging Face folder, or icpo/tiny")
    ev.add_argument("--data", required=True, nargs="+", help="JSONL or parquet files, verl schema")
    ev.add_argument("--n", type=int, default=1, help="answers per prompt (mean@n)")
    ev.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ev.add_argument("--max-new-tokens", type=int, default=3072)
    ev.add_argument("--max-prompt-length", type=int, default=2048)
    ev.add_argument("--max-samples", type=int, default=0, help="first N prompts only (0 = all)")
    ev.add_argument("--batch-size", type=int, default=64, help="prompts per generate call")
    ev.add_argument("--template", default="r1", choices=["r1", "none"])
    ev.add_argument("--reward", default="icpo.rewards.verifiable:compute_score")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: as trainer.num_threads, see docs/install.md)")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev.set_defaults(fn=_eval)

    data = sub.add_parser("data", help="make datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    arith = data_sub.add_parser("make-arithmetic",
                                help="write the tiny arithmetic task's train/val JSONL "
                                "(verl schema)")
    arith.add_argument("--out", default="data/arithmetic",
                       help="output folder (default: %(default)s)")
    arith.add_argument("--train", type=int, default=4000,
                       help="training problems (default: %(default)s)")
    arith.add_argument("--val", type=int, default=200,
                       help="held-out problems (default: %(default)s)")
    arith.add_argument("--test", type=int, default=0, help="held-out test problems (0 = none)")
    arith.add_argument("--overwrite", action="store_true",
                       help="replace train/val/test .jsonl files already in --out (else refused)")
    arith.set_defaults(fn=_make_arithmetic)

    fc = sub.add_parser(
        "filter-coarse", help="the paper's coarse-grained data: keep the prompts whose G sampled "
        "responses are all correct or all wrong", description="Sample G responses per prompt "
        "with the base model and write the prompts whose responses were all correct or all "
        "incorrect (the paper's coarse-grained setting, Table 2), plus a JSON summary. "
        "See docs/experiments_protocol.md.")
    fc.add_argument("--model", required=True, help="base model: Hugging Face folder, or icpo/tiny")
    fc.add_argument("--data", required=True, nargs="+", help="training files (verl schema)")
    fc.add_argument("--out", required=True, help="filtered data file to write (.jsonl or .parquet)")
    fc.add_argument("--summary", default=None, help="JSON summary path (default: OUT.summary.json)")
    fc.add_argument("--n", type=int, default=5, help="G, responses per prompt (paper: 5)")
    fc.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (> 0)")
    fc.add_argument("--max-new-tokens", type=int, default=3072)
    fc.add_argument("--seed", type=int, default=0, help="sampling seed")
    fc.add_argument("--reward", default="icpo.rewards.verifiable:compute_score",
                    help="reward function; correct = its 'acc' (score > 0 for a plain number)")
    fc.add_argument("--answer-weight", type=float, default=0.9)
    fc.add_argument("--format-weight", type=float, default=0.1)
    fc.add_argument("--prompt-key", default="prompt")
    fc.add_argument("--answer-key", default="reward_model.ground_truth")
    fc.add_argument("--template", default="r1", choices=["r1", "none"])
    fc.add_argument("--max-prompt-length", type=int, default=2048)
    fc.add_argument("--batch-size", type=int, default=64, help="prompts per generate call")
    fc.add_argument("--overwrite", action="store_true", help="replace existing output files")
    fc.set_defaults(fn=_filter_coarse)

    ex = sub.add_parser(
        "export", help="merge LoRA adapters into their base model: a plain Hugging Face folder",
        description="Load the base model, add the LoRA adapters (W + B·A·alpha/r) and save the "
        "result with the tokenizer as a Hugging Face model folder that loads without PEFT.")
    ex.add_argument("--adapter", required=True,
                    help="PEFT adapter folder, or a LoRA checkpoint (checkpoints/step_N)")
    ex.add_argument("--model", default=None,
                    help="base model (default: the adapter's base_model_name_or_path)")
    ex.add_argument("--out", required=True, help="folder to write (refused if it holds anything)")
    ex.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="weights' dtype (auto: the base checkpoint's)")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    ex.add_argument("--merged", action="store_true",
                    help="accepted for clarity: the export is always the merged model")
    ex.set_defaults(fn=_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    from icpo.errors import run_main

    set_thread_env_defaults()  # before anything imports torch
    args = build_parser().parse_args(argv)
    split_resume(args)
    prog = " ".join(["icpo", args.command, *filter(None, [getattr(args, "data_command", None)])])
    return run_main(prog, lambda: args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
