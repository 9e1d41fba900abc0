"""The ``rnndrop`` command.

rnndrop study long-range --quick    the quick long-range study (CPU, minutes)
rnndrop tune --config t.yaml        each scheme at its own tuned rate (Optuna), then a verdict
rnndrop fit --config a.yaml         train (LightningCLI: fit | validate | test | predict)
rnndrop export-tb runs/...          TensorBoard scalars -> CSV / Markdown table
rnndrop --version                   the installed version
"""

from __future__ import annotations

import sys
from importlib import metadata

from ._extras import INSTALL_TRAIN, missing_train_module

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
USAGE = "usage: rnndrop COMMAND ...\n\ncommands:\n" + __doc__.split("\n\n", 1)[1]


def version() -> str:
    """The installed distribution's version; the package's ``__version__`` when run from a
    source tree that is not installed."""
    try:
        return metadata.version("rnndrop")
    except metadata.PackageNotFoundError:
        from . import __version__

        return __version__


def main(argv: list[str] | None = None) -> int:
    try:
        return _dispatch(argv)
    except ModuleNotFoundError as err:
        if not missing_train_module(err):
            raise
        print(
            f"rnndrop: error: this command needs {err.name!r}, part of the training extras; "
            f"install them with: {INSTALL_TRAIN}",
            file=sys.stderr,
        )
        return 2


def _dispatch(argv: list[str] | None) -> int:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LIGHTNING_COMMANDS:
        from .lit.cli import main as cli_main

        return cli_main(None if from_command_line else argv)
    if argv and argv[0] == "study":
        from .study.cli import main as study_main

        return study_main(argv[1:])
    if argv and argv[0] == "tune":
        try:
            import optuna  # noqa: F401
        except ModuleNotFoundError:
            print("rnndrop: error: `rnndrop tune` needs optuna; install it with: "
                  "pip install 'rnndrop[tune]'", file=sys.stderr)  # fmt: skip
            return 2
        from .study.tune import main as tune_main

        return tune_main(argv[1:])
    if argv and argv[0] == "export-tb":
        from .study.tbexport import main as export_main

        return export_main(argv[1:])
    if argv and argv[0] in ("-V", "--version"):
        print(f"rnndrop {version()}")
        return 0
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0
    what = f"unknown command {argv[0]!r}" if argv else "a command is required"
    print(f"{USAGE}rnndrop: error: {what}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
