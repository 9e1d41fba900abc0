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
