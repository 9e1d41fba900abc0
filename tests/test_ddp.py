"""Two real DDP processes on CPU (gloo): each rank trains on its own, deterministic shard."""

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import lightning as L, torch
    from rnndrop.data import SyntheticDataModule

    out = sys.argv[1]

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def training_step(self, batch, batch_idx):
            x, _ = batch
            self.seen += [[self.current_epoch] + row for row in x.tolist()]
            return self.w.sum() * 0.0 + (self.w ** 2).sum()

        def on_train_end(self):
            with open(f"{out}/rank{self.global_rank}.json", "w") as f:
                json.dump(self.seen, f)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def teardown(self, stage):
            # gloo's threads must stop before the worker exits, else a rare abort at exit
            if torch.distributed.is_initialized():
                torch.distributed.barrier()
                torch.distributed.destroy_process_group()

    if __name__ == "__main__":
        L.seed_everything(0, verbose=False)
        dm = SyntheticDataModule("delayed_recall", distance=2, task_args={"length": 12},
                                 train_size=24, val_size=8, batch_size=4, seed=5)
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=2,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0)
        trainer.fit(Probe(), dm)
    """
)


def _run(tmp_path, name):
    out = tmp_path / name
    out.mkdir()
    script = tmp_path / "ddp_probe.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(out)], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_synthetic_data_under_ddp_is_sharded_and_deterministic(tmp_path):
    from rnndrop.data import SyntheticDataModule

    dm = SyntheticDataModule("delayed_recall", distance=2, task_args={"length": 12},
                             train_size=24, val_size=8, batch_size=4, seed=5)  # fmt: skip
    items = {tuple(dm.datasets["train"][i][0].tolist()) for i in range(24)}
    assert len(items) == 24  # distinct fingerprints

    first = _run(tmp_path, "a")
    for epoch in (0, 1):
        shards = [{tuple(r[1:]) for r in rank if r[0] == epoch} for rank in first]
        assert all(len(s) == 12 for s in shards)  # 24 items, 2 ranks, nothing repeated
        assert not shards[0] & shards[1] and shards[0] | shards[1] == items
    orders = [[tuple(r[1:]) for r in rank if r[0] == e] for rank in first for e in (0, 1)]
    assert orders[0] != orders[1]  # rank 0 reshuffles between epochs
    assert _run(tmp_path, "b") == first  # same seed: the same shards in the same order


EVAL_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import lightning as L, torch
    from rnndrop.data import LanguageModelDataModule, SyntheticDataModule
    from rnndrop.lit import LanguageModelTask, SequenceTask
    from rnndrop.models import LanguageModel, SequenceModel

    out, corpus, devices = sys.argv[1], sys.argv[2], int(sys.argv[3])

    class Done(L.Callback):
        def teardown(self, trainer, pl_module, stage):
            # gloo's threads must stop before the worker exits, else a rare abort at exit
            if torch.distributed.is_initialized():
                torch.distributed.barrier()

    def evaluate(task, dm):
        trainer = L.Trainer(accelerator="cpu", devices=devices, logger=False,
                            strategy="ddp_spawn" if devices > 1 else "auto",
                            enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=[Done()])
        (val,) = trainer.validate(task, dm)
        (test,) = trainer.test(task, dm)
        return {**val, **test}

    if __name__ == "__main__":
        L.seed_everything(0, verbose=False)
        # LM: 4 streams in all, split over the ranks (the same tokens either way)
        lm = LanguageModelDataModule("folder", data_dir=corpus, batch_size=4,
                                     eval_batch_size=4 // devices, bptt=5)
        lm_task = LanguageModelTask(LanguageModel(lm.vocab_size, 8, 12, 2))
        # sequence task: 32 samples, batches of 8 (per rank): no padding duplicates
        seq = SyntheticDataModule("delayed_recall", distance=2, task_args={"length": 12},
                                  train_size=16, val_size=32, test_size=32,
                                  batch_size=8, seed=5)
        seq_task = SequenceTask(SequenceModel("tokens", vocab_size=seq.vocab_size,
                                              output_size=seq.num_classes, hidden_size=8))
        results = {"lm": evaluate(lm_task, lm), "seq": evaluate(seq_task, seq)}
        with open(out, "w") as f:
            json.dump(results, f)
    """
)


def _evaluate(tmp_path, corpus, devices):
    script = tmp_path / "ddp_eval.py"
    script.write_text(EVAL_SCRIPT)
    out = tmp_path / f"eval{devices}.json"
    proc = subprocess.run([sys.executable, str(script), str(out), str(corpus), str(devices)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stderr


@pytest.mark.slow
def test_ddp_validation_and_test_metrics_equal_single_process(tmp_path, text_corpus):
    """Epoch metrics come from torchmetrics, which sums over ranks: 2 DDP processes (gloo)
    must report the single process's perplexity and accuracy on the same data."""
    (one, _), (two, log) = _evaluate(tmp_path, text_corpus, 1), _evaluate(tmp_path, text_corpus, 2)
    for split in ("val", "test"):
        assert two["lm"][f"{split}/ppl"] == pytest.approx(one["lm"][f"{split}/ppl"], rel=1e-5)
        assert two["lm"][f"{split}/loss"] == pytest.approx(one["lm"][f"{split}/loss"], rel=1e-5)
        assert two["seq"][f"{split}/acc"] == pytest.approx(one["seq"][f"{split}/acc"], rel=1e-6)
        assert two["seq"][f"{split}/loss"] == pytest.approx(one["seq"][f"{split}/loss"], rel=1e-5)
    assert one["lm"]["val/ppl"] > 1.0 and 0 < one["seq"]["val/acc"] < 1  # real numbers
    # the values are reduced over ranks already: no advice to sync them (again)
    assert "sync_dist" not in log, [ln for ln in log.splitlines() if "sync_dist" in ln][:3]


GUARD_SCRIPT = textwrap.dedent(
    """
    import sys
    import lightning as L, torch
    from rnndrop.data import SyntheticDataModule
    from rnndrop.lit import NaNGuard, SequenceTask
    from rnndrop.models import SequenceModel

    out = sys.argv[1]

    class PoisonRank1(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_rank == 1 and trainer.global_step == 2:
                with torch.no_grad():
                    pl_module.model.head.bias.fill_(float("nan"))

        def on_exception(self, trainer, pl_module, exception):
            with open(f"{out}/rank{trainer.global_rank}.txt", "w") as f:
                f.write(f"{type(exception).__name__}: {exception}")

    if __name__ == "__main__":
        L.seed_everything(0, verbose=False)
        dm = SyntheticDataModule("delayed_recall", distance=2, task_args={"length": 12},
                                 train_size=64, val_size=16, batch_size=4, seed=5)
        task = SequenceTask(SequenceModel("tokens", vocab_size=dm.vocab_size,
                                          output_size=dm.num_classes, hidden_size=8))
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0,
                            callbacks=[NaNGuard(save_every_n_steps=0), PoisonRank1()])
        try:
            trainer.fit(task, dm)
        except Exception:
            pass  # each rank wrote what stopped it
    """
)


@pytest.mark.slow
def test_one_ranks_nan_loss_stops_every_rank(tmp_path):
    script = tmp_path / "ddp_guard.py"
    script.write_text(GUARD_SCRIPT)
    # without the shared verdict rank 0 waits in backward's all-reduce: the timeout fails it
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True,
                          text=True, timeout=240)  # fmt: skip
    stopped = {r: (tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)
               if (tmp_path / f"rank{r}.txt").exists()}  # fmt: skip
    assert set(stopped) == {0, 1}, proc.stderr[-3000:]
    assert stopped[1].startswith("NonFiniteLossError: rnndrop: non-finite loss")
    assert stopped[0].startswith("NonFiniteLossError: rnndrop: a bad loss on another rank")
    assert "global step 2" in stopped[0] and "global step 2" in stopped[1]
