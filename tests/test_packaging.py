"""The layers need torch alone; the command says which extra to install when one is missing."""

import subprocess
import sys

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


def test_command_without_the_training_extra_names_it():
    res = run("from rnndrop.__main__ import main\nraise SystemExit(main(['fit', '--help']))\n")
    assert res.returncode == 2, res.stderr
    assert "pip install 'rnndrop[train]'" in res.stderr
    assert "Traceback" not in res.stderr
