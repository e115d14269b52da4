"""The one command line: ``crowd SUBCOMMAND ...``, also ``python -m helpers SUBCOMMAND ...``.

Every subcommand lives in a tools module as two functions: ``add_arguments(parser)`` declares its
options and ``run(args) -> int`` does the work. This module only dispatches, with one error
contract for all of them: bad input (a usage error or a :class:`helpers.errors.CrowdError`) prints
a single ``error: ...`` line to stderr and exits with status 1, never a traceback.
``torchrun --nproc_per_node=N -m helpers train ...`` launches distributed training.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

#: name -> (module, function that adds the options, function that runs, one-line help)
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "verify": ("helpers.tools.verify", "add_verify_arguments", "run_verify",
               "check a ShanghaiTech download: counts, image/annotation pairs, sha256"),
    "where": ("helpers.tools.verify", "add_where_arguments", "run_where",
              "which dataset the series uses, and why"),
    "synth": ("helpers.tools.synth", "add_arguments", "run",
              "(re)generate the synthetic crowd set"),
    "density": ("helpers.tools.cache", "add_arguments", "run",
                "build or check the cache of ground-truth density maps (HDF5)"),
    "train": ("helpers.tools.trainer", "add_arguments", "run",
              "train a density regressor (resume, time budget, DDP under torchrun)"),
    "predict": ("helpers.tools.inference", "add_arguments", "run",
                "count the people in your own images with a checkpoint"),
    "evaluate": ("helpers.tools.evaluate", "add_arguments", "run",
                 "score a checkpoint or a baseline on a split (MAE, RMSE, GAME, P/R/F1)"),
    "runs": ("helpers.tools.runs", "add_arguments", "run",
             "list the trained runs, best validation MAE first"),
    "report": ("helpers.tools.report", "add_arguments", "run",
               "assemble report/report.md and the figure sheet from report/"),
    "import-points": ("helpers.tools.folders", "add_arguments", "run",
                      "arrange LabelMe / CVAT / VIA head-point exports as a dataset (your own data)"),
}  # fmt: skip


class _Parser(argparse.ArgumentParser):
    """Usage errors as one ``error: ...`` line and exit status 1, like every other bad input."""

    def error(self, message: str):  # type: ignore[override]
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(1)


def _overview(prog: str) -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [f"usage: {prog} SUBCOMMAND [options]   ({prog} SUBCOMMAND --help for its options)",
             "", "subcommands:"]
    lines += [f"  {name:<{width}}  {spec[3]}" for name, spec in COMMANDS.items()]
    return "\n".join(lines)


def build_parser(command: str, prog: str = "crowd") -> argparse.ArgumentParser:
    """The argument parser of one subcommand (its module is imported only now)."""
    module_name, add_name, _, help_text = COMMANDS[command]
    parser = _Parser(prog=f"{prog} {command}", description=help_text,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    getattr(importlib.import_module(module_name), add_name)(parser)
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "crowd") -> int:
    """Run one subcommand; returns the exit status (0 success, 1 bad input)."""
    from helpers.errors import CrowdError

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_overview(prog))
        return 0 if args else 1
    command = args[0]
    if command not in COMMANDS:
        print(f"error: unknown subcommand {command!r}; choose one of {', '.join(COMMANDS)} "
              f"(see {prog} --help)", file=sys.stderr)
        return 1
    parsed = build_parser(command, prog).parse_args(args[1:])
    module_name, _, run_name, _ = COMMANDS[command]
    try:
        return int(getattr(importlib.import_module(module_name), run_name)(parsed) or 0)
    except CrowdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def console_main() -> None:
    """Entry point of the ``crowd`` console script."""
    sys.exit(main())
