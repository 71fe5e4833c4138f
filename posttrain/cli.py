"""`posttrain <command> [CONFIG] [flags] [key=value ...]` — every command is also a Python function.

Precedence: config file < flags < key=value overrides. Runners are imported only when their command runs,
so `posttrain --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys

# everyday flags -> dotted config keys (the README's command contract)
FLAGS = {
    "model": "model.name_or_path",
    "data": "data.path",
    "output_dir": "train.output_dir",
    "max_steps": "train.max_steps",
    "seed": "train.seed",
    "device": "train.device",
    "ref_model": "algo.ref_model",
    "reward_model": "algo.reward_model",
    "reward": "algo.rewards",
}


def _resolve(target: str):
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


# everyday flags that set an algo-section key, added where the command has that key (under its current name:
# `algo.ref_model` is `algo.reference.model` for the online commands): FLAGS name -> (flag, argparse options)
SECTION_FLAGS = {
    "ref_model": ("--ref-model", {"dest": "ref_model", "help": "reference model (default: the starting policy)"}),
    "reward_model": ("--reward-model", {"dest": "reward_model", "help": "reward model folder"}),
    "reward": ("--reward", {"dest": "reward", "action": "append", "help": "reward function name or module:function (repeatable)"}),
}


def _add_train_parser(sub, name: str, help_text: str, chosen: bool = False) -> None:
    """The command's parser. Only the command being run (`chosen`, its module imported) gets the flags of its algo
    section and, after the flags, the listing of every config key with its type, default and doc."""
    listing, keys = None, set()
    if chosen:
        from functools import partial

        from posttrain.config import config_keys, current_key
        from posttrain.config_docs import help_epilog
        from posttrain.train import registry

        registry.get(name)  # imports the command's module: registers its algo section and renamed keys
        keys = {current_key(FLAGS[flag], name) for flag in SECTION_FLAGS} & set(config_keys(name))
        listing = partial(help_epilog, name)
    p = sub.add_parser(name, help=help_text, description=help_text, epilog_fn=listing,
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # the listing is aligned already
    p.add_argument("config", nargs="?", help=f"YAML config file (optional; `posttrain config {name}` writes one)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=1e-5 (keys listed below)")
    p.add_argument("--model", help="model folder, .gguf file, hub id, or 'smollm2' (bundled)")
    p.add_argument("--data", help="dataset: .jsonl/.json/.parquet, a saved HF dataset, or task:arithmetic")
    p.add_argument("--output-dir", dest="output_dir", help="run directory")
    p.add_argument("--max-steps", dest="max_steps", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto (cuda:LOCAL_RANK when CUDA is available, else cpu) | cpu | cuda | cuda:N")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument("--num-processes", dest="num_processes", type=int, default=1,
                   help="data-parallel processes on this machine (or launch with accelerate launch / torchrun)")
    for flag_name, (flag, options) in SECTION_FLAGS.items():
        if keys and current_key(FLAGS[flag_name], name) in keys:
            p.add_argument(flag, **options)


class _Parser(argparse.ArgumentParser):
    """A subcommand's parser whose epilog is made only when its help is shown: the config-key listing reads the
    field docs from the modules' source (0.1 s of parsing), which a training run has no use for."""

    def __init__(self, *args, epilog_fn=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.epilog_fn = epilog_fn

    def format_help(self) -> str:
        if self.epilog_fn is not None:
            self.epilog, self.epilog_fn = self.epilog_fn(), None
        return super().format_help()


def _add_config_parser(sub, commands) -> None:
    p = sub.add_parser("config", help="print a command's full default config as YAML, each key's doc as a comment",
                       description="Print a command's full default config as YAML, each key's doc as a comment: "
                                   "posttrain config grpo > grpo.yaml, edit it, then posttrain grpo grpo.yaml.")
    p.add_argument("of", metavar="COMMAND", choices=list(commands), help=" | ".join(commands))
    p.set_defaults(func=_print_config)


def _print_config(args) -> int:
    from posttrain.config_docs import default_yaml
    from posttrain.train import registry

    print(default_yaml(args.of, registry.get(args.of).help), end="")
    return 0


def _split_config_and_overrides(args) -> tuple[str | None, list[str]]:
    config, overrides = args.config, list(args.overrides)
    if config and "=" in config:  # no config file given: the first positional is an override
        overrides.insert(0, config)
        config = None
    return config, overrides


def config_from_args(command: str, args):
    from posttrain.config import load_config
    from posttrain.train import registry

    registry.get(command)  # imports the command's module: registers its algo section
    config, overrides = _split_config_and_overrides(args)
    flags = {dotted: getattr(args, name, None) for name, dotted in FLAGS.items()}
    if getattr(args, "resume", False):
        flags["train.resume"] = True
    return load_config(command, config, overrides, flags)


def build_parser(chosen: str | None = None) -> argparse.ArgumentParser:
    """All commands, only the one being run (`chosen`) in full: a training command's flags and key listing import
    its module, eval's parser lives in posttrain.evaluate (torch). The others are their help line, enough for
    `posttrain --help`, which so imports no torch."""
    from posttrain.train import registry

    parser = argparse.ArgumentParser(prog="posttrain", description="Post-training for language models.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    commands = registry.discover()
    for name, (_, help_text) in commands.items():
        _add_train_parser(sub, name, help_text, chosen=name == chosen)
    _add_config_parser(sub, commands)
    if chosen == "eval":
        from posttrain.evaluate import add_eval_parser

        add_eval_parser(sub)
    else:
        sub.add_parser("eval", help=EVAL_HELP)
    for name, target, help_text in EXTRA_COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            _resolve_parser(target)(p)
    return parser


EVAL_HELP = "evaluate a model with reward functions, or a reward model on pairs"  # as posttrain.evaluate words it

# commands with their own arguments: (name, "module:add_arguments", help)
EXTRA_COMMANDS = [
    ("pipeline", "posttrain.pipeline:add_arguments", "run the stages of a pipeline YAML (finished stages are skipped)"),
    ("demo", "posttrain.pipeline:add_demo_arguments", "the demo pipeline on SmolLM2 with the arithmetic task"),
    ("report", "posttrain.report:add_arguments", "rebuild the HTML/Markdown report of a run directory"),
    ("pairs", "posttrain.onpolicy_pairs:add_arguments", "preference pairs from a policy's own samples, labelled by a verifier"),
]


def _resolve_parser(target: str):
    """The command's argument builder; a command whose optional third-party dependency is not installed says so
    when run. An ImportError of posttrain's own code is a bug and is raised, not reported as "not available"."""
    try:
        return _resolve(target)
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] == "posttrain":
            raise
        return lambda p, missing=err.name: p.set_defaults(unavailable=f"{target} needs {missing}")


def _without_num_processes(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--num-processes":
            skip = True
        elif not arg.startswith("--num-processes="):
            out.append(arg)
    return out


def _command_in(argv: list[str]) -> str | None:
    """The command word of a command line (the first argument that is not an option)."""
    return next((a for a in argv if not a.startswith("-")), None)


def _exit_rank_now() -> None:
    """End a finished rank of a multi-process run without the interpreter's teardown. Under load a rank that had
    exported and ended its process group still aborted now and then in C++ static destructors ("terminate called
    without an active exception", a joinable std::thread of the collective backend), failing a run whose work was
    complete. Everything is written and closed by now; streams are flushed, then the process leaves."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    from posttrain.train import registry

    parser = build_parser(_command_in(argv if argv is not None else sys.argv[1:]))
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may follow the flags; argparse stops collecting positionals at the first flag
    stray = [e for e in extra if e.startswith("-") or "=" not in e]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from posttrain.config import ConfigError
    from posttrain.data.formats import DataError
    from posttrain.devices import DeviceError, check_launch

    try:
        if args.command in registry.discover():
            cfg = config_from_args(args.command, args)  # validated before any process is started
            check_launch(cfg.train.device, max(1, args.num_processes))
            if args.num_processes > 1 and "WORLD_SIZE" not in os.environ:
                from posttrain.train.distributed import launch

                return launch(_without_num_processes(argv if argv is not None else sys.argv[1:]), args.num_processes)
            from posttrain.train.distributed import shutdown

            try:
                result = registry.run(cfg)
            finally:
                shutdown()
            if os.environ.get("RANK", "0") == "0":
                print(json.dumps(result, indent=1, default=str))
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                _exit_rank_now()
            return 0
        if getattr(args, "unavailable", None):
            print(f"posttrain {args.command}: not available in this build ({args.unavailable})", file=sys.stderr)
            return 2
        return args.func(args) or 0
    except (ConfigError, DataError, DeviceError, FileNotFoundError, ValueError) as exc:  # the input's fault
        if args.verbose:
            raise
        print(f"posttrain {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    # a diverged run (NonFiniteLossError), a failed or refused checkpoint; an OSError (a run directory that cannot
    # be written, a full disk) is the run's failure too, not a wrong input: exit 1 like them, one line (-v: traceback)
    except (RuntimeError, OSError) as exc:
        if args.verbose:
            raise
        print(f"posttrain {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 1


def _one_line(exc: BaseException) -> str:
    """The error as one line: a message from a library may span lines (PyYAML, transformers), and a script reading
    stderr, or a person, should get the whole of it on the line that says `error:`."""
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
