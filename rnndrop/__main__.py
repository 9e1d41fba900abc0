"""The ``rnndrop`` command.

rnndrop study long-range --quick    the quick long-range study (CPU, minutes)
rnndrop fit --config a.yaml         train (LightningCLI: fit | validate | test | predict)
rnndrop export-tb runs/...          TensorBoard scalars -> CSV / Markdown table
rnndrop demo [--steps N]            train a small LSTM with each scheme on delayed recall
"""

from __future__ import annotations

import argparse
import sys

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LIGHTNING_COMMANDS:
        from .lit.cli import main as cli_main

        return cli_main(None if from_command_line else argv)
    if argv and argv[0] == "study":
        from .study.cli import main as study_main

        return study_main(argv[1:])
    if argv and argv[0] == "export-tb":
        from .tbexport import main as export_main

        return export_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="rnndrop", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small LSTM with each dropout scheme (CPU, ~2 min)")
    demo.add_argument("--steps", type=int, default=1500, help="training steps per scheme")
    demo.add_argument("--distance", type=int, default=10, help="recall distance d")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(steps=args.steps, distance=args.distance, seed=args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
