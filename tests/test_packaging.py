"""The layers need torch alone; the command says which extra to install when one is missing."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

BLOCK = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None  # an import of it now raises ModuleNotFoundError
"""

TRAIN_ONLY = ["numpy", "lightning", "pytorch_lightning", "torchmetrics", "tensorboard",
              "jsonargparse", "matplotlib", "yaml", "tqdm"]  # fmt: skip


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK.format(blocked=TRAIN_ONLY) + code],
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_layers_import_and_run_with_torch_alone():
    res = run(
        "import torch\n"
        "from rnndrop.nn import GRU, LSTM, GRUCell, LSTMCell\n"
        "from rnndrop import functional, config, kernels\n"
        "m = LSTM(3, 4, dropout='variational').train()\n"
        "out, _ = m(torch.randn(5, 2, 3)); out.sum().backward()\n"
        "g = GRU(3, 4, dropout={'recurrent': 0.2, 'tied': False}).train()\n"
        "out, _ = g(torch.randn(5, 2, 3)); out.sum().backward()\n"
        "print('ok')\n"
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith("ok")


@pytest.mark.parametrize("argv", [["fit", "--help"], ["export-tb", "runs"]])
def test_command_without_the_training_extra_names_it(argv):
    """``export-tb`` too: it reads TensorBoard's events (rnndrop.study.tbexport)."""
    res = run(f"from rnndrop.__main__ import main\nraise SystemExit(main({argv!r}))\n")
    assert res.returncode == 2, res.stderr
    assert 'pip install "rnndrop[train]"' in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize(
    "package", ["rnndrop.lit", "rnndrop.lit.callbacks", "rnndrop.data", "rnndrop.study"]
)
def test_importing_a_training_package_without_the_extra_names_it(package):
    """As a user finds it: ``import rnndrop.lit`` with Lightning not installed."""
    res = run(
        f"try:\n    import {package}\n"
        "except ImportError as err:\n"
        "    print(type(err).__name__, '|', err.name, '|', err)\n"
    )
    assert res.returncode == 0, res.stderr
    kind, name, message = (part.strip() for part in res.stdout.split("|", 2))
    assert kind == "ModuleNotFoundError" and name in TRAIN_ONLY  # still catchable as before
    assert 'pip install "rnndrop[train]"' in message and package.rsplit(".", 1)[0] in message


def test_a_missing_module_outside_the_extra_is_not_renamed():
    res = run("import sys\nsys.modules['rnndrop.lit.base'] = None\nimport rnndrop.lit\n")
    assert res.returncode != 0
    assert "rnndrop[train]" not in res.stderr and "rnndrop.lit.base" in res.stderr


def _pyproject_version() -> str:
    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    return re.search(r'^version = "([^"]+)"', text, re.M).group(1)


def test_version_flag_prints_the_version():
    res = subprocess.run([sys.executable, "-m", "rnndrop", "--version"], capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"rnndrop {_pyproject_version()}"


def test_version_falls_back_to_the_package_version_when_not_installed():
    """From a source tree that is not installed, importlib.metadata knows no rnndrop."""
    res = run(
        "from importlib import metadata\n"
        "def version(name):\n"
        "    raise metadata.PackageNotFoundError(name)\n"
        "metadata.version = version\n"
        "from rnndrop.__main__ import main\n"
        "raise SystemExit(main(['--version']))\n"
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"rnndrop {_pyproject_version()}"
