"""The `spinlm` command. Every subcommand takes key=value overrides on top of the packaged config."""
from __future__ import annotations

import argparse
import errno
import logging
import signal
import sys

from spinlm.process_defaults import apply_process_defaults

apply_process_defaults()  # before torch is imported (by the modules below)

from spinlm.config import load_config, to_yaml
from spinlm.errors import ConfigError, Terminated, UserError
from spinlm.data.example import DataError
from tqdm.contrib.logging import logging_redirect_tqdm


class ConsoleFormat(logging.Formatter):
    """The library's log lines on stderr (stdout stays the command's own output, e.g. `config show`'s YAML):
    notes as ``spinlm: ...``, warnings and errors with their level."""

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno < logging.WARNING else f"{record.levelname}: "
        return f"spinlm: {level}{record.getMessage()}"


def _cmd_train(args) -> int:
    from spinlm.api import train  # the same steps as spinlm.train() in a notebook
    from spinlm.report import round_table_text

    result = train(args.overrides)
    if result.rounds:
        print(round_table_text(result.rounds))
    if result.report is not None:
        print(f"report: {result.report}")
    return 0


def _cmd_sft(args) -> int:
    from spinlm.sft import run_sft_from_config
    from spinlm.tasks.build import ensure_bundled_task

    cfg = load_config(args.overrides)
    ensure_bundled_task(cfg)
    run_sft_from_config(cfg)
    return 0


def _cmd_evaluate(args) -> int:
    from spinlm.evaluate_command import evaluate_path, format_table, write_rows

    rows = evaluate_path(args.path, args.overrides)
    print(format_table(rows))
    if args.output:
        write_rows(rows, args.output)
    return 0


def _cmd_prepare(args) -> int:
    if args.dataset == "model":
        from spinlm.prepare_model import gguf_to_hf

        if not args.gguf:
            raise UserError("spinlm prepare model needs --gguf FILE (the GGUF file to convert)")
        print(f"spinlm prepare model: wrote {gguf_to_hf(args.gguf, args.output)}")
        return 0
    if not args.input:
        raise UserError(f"spinlm prepare {args.dataset} needs --input FILE")
    from spinlm.data.prepare import GSM8K_INSTRUCTION, prepare

    n = prepare(args.dataset, args.input, args.output, split=args.split, limit=args.limit, data_source=args.data_source,
                instruction=GSM8K_INSTRUCTION if args.instruction is None else args.instruction)
    print(f"spinlm prepare {args.dataset}: wrote {n} rows to {args.output}")
    return 0


def _cmd_config(args) -> int:
    from spinlm.config_check import check_config
    from spinlm.tasks.build import ensure_bundled_task

    cfg = load_config(args.overrides)
    if args.action == "show":
        preset = cfg.get("preset")
        print(f"# preset: {preset} (spinlm/config/preset/{preset}.yaml over the defaults)" if preset
              else "# preset: none (the packaged defaults, spinlm/config/default.yaml)")
        print(to_yaml(cfg), end="")
        return 0
    ensure_bundled_task(cfg)
    problems = check_config(cfg)
    if problems:
        print(f"config check: {len(problems)} problem(s)", file=sys.stderr)
        for p in problems:
            print(f"- {p}", file=sys.stderr)
        return 2
    from spinlm.config_check import ignored_key_warnings

    for warning in ignored_key_warnings(cfg):
        print(f"WARNING: {warning}", file=sys.stderr)
    print("config check: OK")
    return 0


def _cmd_task(args) -> int:
    from spinlm.tasks.build import build_tiny_task

    build_tiny_task(args.output, seed=args.seed, force=args.force)
    return 0


def _cmd_report(args) -> int:
    from spinlm.report import write_report

    print(f"report: {write_report(args.run_dir)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spinlm", description="Self-play fine-tuning (SPIN) and online DPO.")
    sub = parser.add_subparsers(dest="command", required=True)

    for name, fn, text in [
        ("train", _cmd_train, "run SPIN / online-DPO rounds (in-process, or Ray + FSDP2 ranks)"),
        ("sft", _cmd_sft, "supervised fine-tuning with a response-only loss (the warm start)"),
    ]:
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. preset=smoke trainer.rounds=2")
        p.add_argument("--debug", action="store_true", help="show Python tracebacks")
        p.set_defaults(func=fn)

    text = "greedy accuracy, pass@k and lm-eval tasks of a checkpoint, or of every round of a run directory"
    p = sub.add_parser("evaluate", help=text, description=text)
    p.add_argument("path", help="a run directory (every checkpoints/<t>), a checkpoint, or a Hugging Face model folder")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. eval.n=8 eval.pass_k=[1,8] data.val_files=val.jsonl")
    p.add_argument("--output", help="also write every metric (per data_source too) as JSON to this file")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks")
    p.set_defaults(func=_cmd_evaluate)

    text = ("convert a local GSM8K / UltraChat / chat-messages file into verl-format rows spinlm reads, or a GGUF "
            "model file into a Hugging Face model folder")
    p = sub.add_parser("prepare", help=text, description=text)
    p.add_argument("dataset", choices=["gsm8k", "ultrachat", "messages", "model"],
                   help="gsm8k: question/answer jsonl; ultrachat: messages (first user turn -> first assistant turn, "
                        "the SPIN paper's recipe); messages: any chat file (last assistant turn is the answer); "
                        "model: --gguf FILE into the folder --output (needs the gguf extra: pip install -e '.[gguf]')")
    p.add_argument("--input", help="a parquet, jsonl or json file (the datasets)")
    p.add_argument("--gguf", help="model: a .gguf file (dequantised to float32)")
    p.add_argument("--output", required=True, help="the .parquet (or .jsonl) file to write; model: a new folder")
    p.add_argument("--split", default="train", help="written to extra_info.split (default train)")
    p.add_argument("--limit", type=int, help="convert only the first N rows")
    p.add_argument("--data-source", help="data_source of every row (default: openai/gsm8k, "
                                         "HuggingFaceH4/ultrachat_200k, or the row's own / chat)")
    p.add_argument("--instruction", help="gsm8k: text appended to each question (default: verl's "
                                         "'Let's think step by step ... after \"####\".'; '' for none)")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("config", help="print the resolved config or check it", description="config show | check")
    p.add_argument("action", choices=["show", "check"], help="show: print the resolved YAML; check: run every config rule")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks")
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("report", help="plots, round table and example pairs of a run directory (report.html)",
                       description="write RUN_DIR/report/: PNG plots, report.md and a self-contained report.html")
    p.add_argument("run_dir", help="a run directory (trainer.output_dir of a run)")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("task", help="build the bundled tiny task (data, tokenizer, SFT warm start)",
                       description="build the bundled tiny arithmetic task into a folder (cached)")
    p.add_argument("action", choices=["build"])
    p.add_argument("--output", default=".cache/tiny_task", help="folder to build into (default .cache/tiny_task)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rebuild even if a complete build is there")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks")
    p.set_defaults(func=_cmd_task)
    return parser


def _on_sigterm(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated()


def disk_full(exc: BaseException | None) -> bool:
    """ENOSPC anywhere in the exception's chain; safetensors and torch.save wrap it in their own error types."""
    while exc is not None:
        if getattr(exc, "errno", None) == errno.ENOSPC or "No space left on device" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)  # stop as Ctrl-C does, not with -15 and no word
    logger = logging.getLogger("spinlm")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(ConsoleFormat())
    logger.addHandler(console)
    logger.setLevel(logging.INFO)
    try:
        with logging_redirect_tqdm(loggers=[logger]):  # a log line printed while a bar runs does not break it
            return args.func(args)
    except (ConfigError, DataError, UserError) as exc:
        if args.debug:
            raise
        print(f"spinlm {args.command}: error:\n{exc}" if isinstance(exc, ConfigError)
              else f"spinlm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Terminated:
        kept = "; the last complete checkpoint is kept" if args.command == "train" else ""
        print(f"spinlm {args.command}: terminated (SIGTERM){kept}", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"spinlm {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # only a full disk is answered here; everything else propagates as it was
        if args.debug or not disk_full(exc):
            raise
        kept = (" The checkpoint being written was discarded and the last complete one is kept: free space and run "
                "the same command again to resume." if args.command == "train" else " Free space and run it again.")
        print(f"spinlm {args.command}: error: the disk is full ({type(exc).__name__}: {exc}).{kept}", file=sys.stderr)
        return 2
    finally:
        logger.removeHandler(console)


if __name__ == "__main__":
    sys.exit(main())
