#!/usr/bin/env python
"""Training overhead: tokens/s of ``rnndrop fit`` (LightningCLI, ``Trainer.fit`` and
:class:`~rnndrop.lit.LanguageModelTask`), or of the task in a user's own plain ``Trainer``
(``--lightning trainer``), against a bare PyTorch TBPTT loop.

Both sides train the same model (2x200 LSTM, ``RecurrentDropout.variational(0.5)``, the PTB
vocabulary of 10,000 words) on the same 20x35 batches (``LanguageModelDataModule``) with SGD
(lr 1) and gradient clipping at norm 5. The Lightning side is built by the CLI with its
defaults (TensorBoard logger, progress bar, learning-rate logger, NaN/divergence guard,
checkpoints, and the training defaults of :func:`rnndrop.runtime.training_defaults`: the
allocator setting and subnormal flushing), so what is measured is what a user runs. With
``--lightning trainer`` the task runs in ``L.Trainer(gradient_clip_val=5, ...)`` as a user
writes it, and gets the same defaults from the task itself. The bare loop does no host sync
at all; ``--same-allocator`` gives it the same allocator setting, ``--same-settings`` the
allocator and the subnormal setting (the framework's own overhead alone).

Each round runs the two in separate processes, in alternating order, and times ``--steps``
steps after ``--warmup`` steps (from the start of one batch to the start of the batch
``--steps`` later, so every per-step hook is inside the window). The report is the median
tokens/s of each side and the ratio of the medians (bare / Lightning: 1.00 = no overhead).

    python scripts/bench_training.py                      # synthetic PTB-sized corpus, CPU
    python scripts/bench_training.py --rounds 5 --threads 1
    python scripts/bench_training.py --same-allocator     # allocator effects aside
    python scripts/bench_training.py --lightning trainer --same-settings  # a plain Trainer
    python scripts/bench_training.py --data-dir ../shared/data/ptb     # the real PTB
    python scripts/bench_training.py --device cuda --hidden 650       # a GPU, PTB-medium
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VOCAB = 10_000  # PTB's
BATCH, BPTT = 20, 35


def synthetic_corpus(root: Path, tokens: int, seed: int = 0) -> Path:
    """train/valid/test text files of ``tokens`` random words from a 10,000-word vocabulary
    (every word appears in train, so the vocabulary is exactly PTB's size with ``<eos>``)."""
    import random

    rng = random.Random(seed)
    words = [f"w{i}" for i in range(VOCAB - 1)]  # + <eos>
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", tokens), ("valid", 2000), ("test", 2000)):
        stream = list(words) if split == "train" else []
        stream += rng.choices(words, k=max(0, n - len(stream)))
        lines = [" ".join(stream[i : i + 20]) for i in range(0, len(stream), 20)]
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def data_module(args):
    from rnndrop.data import LanguageModelDataModule

    if args.data_dir:
        return LanguageModelDataModule("ptb", data_dir=args.data_dir, batch_size=BATCH, bptt=BPTT)
    return LanguageModelDataModule("folder", data_dir=args.corpus, batch_size=BATCH, bptt=BPTT)


def config_yaml(args) -> str:
    # batch_size and bptt explicitly: the CLI's default data module (synthetic) has its own
    corpus = (f"ptb, data_dir: {args.data_dir}" if args.data_dir
              else f"folder, data_dir: {args.corpus}")  # fmt: skip
    return f"""
model:
  class_path: rnndrop.lit.LanguageModelTask
  init_args:
    model:
      class_path: rnndrop.models.LanguageModel
      init_args:
        embedding_size: {args.hidden}
        hidden_size: {args.hidden}
        num_layers: 2
        dropout: {{preset: variational, p: 0.5}}
    optimizer: sgd
    lr: 1.0
data:
  class_path: rnndrop.data.LanguageModelDataModule
  init_args: {{corpus: {corpus}, batch_size: {BATCH}, bptt: {BPTT}}}
trainer:
  accelerator: {args.device}
  devices: 1
  gradient_clip_val: 5.0
  max_epochs: 100
  limit_val_batches: 0
  num_sanity_val_steps: 0
"""


class Window:
    """Times steps ``warmup .. warmup + steps`` (batch start to batch start): wall-clock and
    the process's CPU time (all its threads), which other jobs on a shared machine disturb
    far less."""

    def __init__(self, warmup: int, steps: int, cuda: bool) -> None:
        self.warmup, self.steps, self.cuda = warmup, steps, cuda
        self.start: tuple[float, ...] | None = None
        self.seconds: dict[str, float] | None = None

    def at_batch_start(self, i: int) -> bool:
        """Call at the start of batch ``i``; True when the window is complete."""
        if i == self.warmup or i == self.warmup + self.steps:
            if self.cuda:
                import torch

                torch.cuda.synchronize()
            usage = resource.getrusage(resource.RUSAGE_SELF)
            now = (time.perf_counter(), time.process_time(), usage.ru_stime, usage.ru_minflt)
            if i == self.warmup:
                self.start = now
            else:
                wall, cpu, sys_, faults = (b - a for a, b in zip(self.start, now, strict=True))
                self.seconds = {"wall": wall, "cpu": cpu, "sys": sys_, "faults": faults}
                return True
        return False


def run_lightning(args) -> dict[str, float]:
    from lightning.pytorch.callbacks import Callback

    from rnndrop.lit.cli import make_cli

    config = Path(args.tmp) / "bench.yaml"
    config.write_text(config_yaml(args))
    window = Window(args.warmup, args.steps, args.device == "cuda")

    class Timer(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if window.at_batch_start(trainer.global_step):
                trainer.should_stop = True  # ends after this batch (outside the window)

    cli = make_cli([f"--config={config}", f"--trainer.default_root_dir={args.tmp}",
                    f"--trainer.max_steps={args.warmup + args.steps + 1}"], run=False)  # fmt: skip
    cli.trainer.callbacks.append(Timer())
    loader = cli.datamodule.train_dataloader()
    assert next(iter(loader))[0].shape == (BATCH, BPTT), "not the bare loop's batches"
    cli.trainer.fit(cli.model, cli.datamodule)
    return window.seconds


def run_trainer(args) -> dict[str, float]:
    """The task in a plain ``Trainer``, as the README shows users to write it."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from rnndrop.config import RecurrentDropout
    from rnndrop.lit import LanguageModelTask
    from rnndrop.models import LanguageModel

    dm = data_module(args)
    dm.setup("fit")
    net = LanguageModel(dm.vocab_size, args.hidden, args.hidden, 2,
                        dropout=RecurrentDropout.variational(0.5))  # fmt: skip
    task = LanguageModelTask(net, optimizer="sgd", lr=1.0)
    window = Window(args.warmup, args.steps, args.device == "cuda")

    class Timer(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if window.at_batch_start(trainer.global_step):
                trainer.should_stop = True

    trainer = L.Trainer(accelerator=args.device, devices=1, gradient_clip_val=5.0,
                        max_steps=args.warmup + args.steps + 1, limit_val_batches=0,
                        num_sanity_val_steps=0, default_root_dir=args.tmp,
                        callbacks=[Timer()])  # fmt: skip
    trainer.fit(task, datamodule=dm)
    return window.seconds


def run_bare(args) -> dict[str, float]:
    import torch
    from torch.nn import functional as F

    from rnndrop.config import RecurrentDropout
    from rnndrop.lit import detach_state
    from rnndrop.models import LanguageModel

    if args.same_settings:  # what the tasks apply (rnndrop.runtime.training_defaults)
        from rnndrop.runtime import training_defaults

        training_defaults()
    dm = data_module(args)
    dm.setup("fit")
    device = torch.device(args.device)
    model = LanguageModel(dm.vocab_size, args.hidden, args.hidden, 2,
                          dropout=RecurrentDropout.variational(0.5)).to(device)  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    window = Window(args.warmup, args.steps, args.device == "cuda")
    model.train()
    state, total = None, torch.zeros((), device=device)
    for i, (x, y) in enumerate(dm.train_dataloader()):
        if window.at_batch_start(i):
            break
        x, y = x.to(device), y.to(device)  # (B, T)
        out = model(x, state)
        state = detach_state(out.state)
        loss = F.cross_entropy(out.logits.flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        total += loss.detach()  # a running loss, kept on the device: no sync
    return window.seconds


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    run = {"lightning": run_lightning, "trainer": run_trainer, "bare": run_bare}[args.worker]
    seconds = run(args)
    if seconds is None:
        sys.exit("the run ended before the timing window closed (corpus too short?)")
    print(json.dumps({"side": args.worker, **seconds}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    p.add_argument("--steps", type=int, default=60, help="timed steps per run (default 60)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (default 10)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument(
        "--hidden",
        type=int,
        default=200,
        help="embedding and hidden size (default 200; PTB-medium: 650)",
    )
    p.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default=None,
        help="what the ratio uses: process CPU time (default on CPU: robust to other "
        "jobs on the machine) or wall-clock (default on CUDA)",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="PTB directory (e.g. ../shared/data/ptb); default: a synthetic corpus",
    )
    p.add_argument(
        "--same-allocator",
        action="store_true",
        help="give the bare loop the allocator setting rnndrop fit makes (glibc MALLOC_* "
        "variables for both sides): the framework's own overhead, allocator effects aside",
    )
    p.add_argument(
        "--same-settings",
        action="store_true",
        help="give the bare loop rnndrop.runtime.training_defaults() (allocator and subnormal "
        "flushing), as the tasks set them: the framework's own overhead alone",
    )
    p.add_argument(
        "--lightning",
        choices=["cli", "trainer"],
        default="cli",
        help="the Lightning side: rnndrop fit's CLI (default) or the task in a plain Trainer",
    )
    p.add_argument("--worker", choices=["lightning", "trainer", "bare"], help=argparse.SUPPRESS)
    p.add_argument("--corpus", help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    clock = args.clock or ("wall" if args.device == "cuda" else "cpu")
    tokens = BATCH * BPTT * args.steps
    trainer_mode = args.lightning == "trainer"
    from rnndrop.runtime import describe_machine

    print(f"# {describe_machine()} (this process; the runs set their own threads and "
          "subnormals)", flush=True)  # fmt: skip

    with tempfile.TemporaryDirectory(prefix="bench_training_") as tmp:
        corpus = None
        if not args.data_dir:  # long enough that no epoch ends inside the window
            n = BATCH * BPTT * (args.warmup + args.steps + 20)
            corpus = synthetic_corpus(Path(tmp) / "corpus", n)
        rates: dict[str, dict[str, list[float]]] = {
            side: {"wall": [], "cpu": []} for side in ("bare", "lightning")
        }
        for r in range(args.rounds):
            order = ("bare", "lightning") if r % 2 == 0 else ("lightning", "bare")
            for side in order:
                run_dir = Path(tmp) / f"run{r}_{side}"
                run_dir.mkdir()
                worker_name = "trainer" if side == "lightning" and trainer_mode else side
                cmd = [sys.executable, __file__, "--worker", worker_name, "--tmp", str(run_dir),
                       "--steps", str(args.steps), "--warmup", str(args.warmup),
                       "--device", args.device, "--threads", str(args.threads),
                       "--hidden", str(args.hidden)]  # fmt: skip
                cmd += ["--same-settings"] if args.same_settings else []
                cmd += ["--data-dir", args.data_dir] if args.data_dir else ["--corpus", str(corpus)]
                # stderr (the progress bar) to a file: not a terminal, as in a SLURM job
                env = {**os.environ, "PYTHONWARNINGS": "ignore"}
                if args.same_allocator:  # what rnndrop.runtime.tune_allocator sets
                    env |= {"MALLOC_MMAP_THRESHOLD_": str(32 << 20),
                            "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}  # fmt: skip
                with open(run_dir / "stderr.txt", "w") as err:
                    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True,
                                          env=env)  # fmt: skip
                if proc.returncode:
                    tail = (run_dir / "stderr.txt").read_text()[-3000:]
                    sys.exit(f"the {side} run failed:\n{tail}")
                res = json.loads(proc.stdout.strip().splitlines()[-1])
                for c in ("wall", "cpu"):
                    rates[side][c].append(tokens / res[c])
                print(f"round {r + 1}/{args.rounds} {side:9s} "
                      f"{1000 * res['wall'] / args.steps:7.1f} ms/step wall, "
                      f"{1000 * res['cpu'] / args.steps:7.1f} ms/step CPU "
                      f"(kernel {1000 * res['sys'] / args.steps:5.1f} ms, "
                      f"{res['faults'] / args.steps:6.0f} page faults)", flush=True)  # fmt: skip
    print(
        f"{args.device}, {args.threads} thread(s), hidden {args.hidden}, "
        f"{'PTB' if args.data_dir else 'synthetic corpus'}, {args.rounds} rounds x "
        f"{args.steps} steps{', same allocator' if args.same_allocator else ''}"
        f"{', same settings' if args.same_settings else ''}; median tokens/s:"
    )
    side = "plain Trainer" if trainer_mode else "rnndrop fit"
    for c in ("cpu", "wall"):
        bare, lit = (statistics.median(rates[s][c]) for s in ("bare", "lightning"))
        mark = "  <- the ratio" if c == clock else ""
        print(
            f"  {c:4s} clock: bare loop {bare:7.0f}, {side} {lit:7.0f}, "
            f"overhead {bare / lit:.3f}x{mark}"
        )


if __name__ == "__main__":
    main()
