"""Faults and checkpoints (issue 23): what a training keeps when it is killed, preempted or
runs out of disk, and one clear line for a checkpoint that cannot be used.

The process tests run `rnndrop fit` in a child (tests/fault_child.py) and kill or signal it
at a known point: during a save (SIGKILL), mid-epoch (SIGKILL, SIGTERM). The reference for
the loss curves is an uninterrupted child run with the same settings."""

import contextlib
import errno
import io
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import torch
from test_cli_errors import run as error_line  # exit 2, one `error:` line, no traceback

from rnndrop.lit.cli import main

TESTS = Path(__file__).resolve().parent
EXP = TESTS.parent / "experiments"
CHILD = TESTS / "fault_child.py"

# 20 training batches an epoch: every run below stops or is stopped mid-epoch
TINY = ["fit", f"--config={EXP / 'synthetic/base.yaml'}", f"--config={EXP / 'synthetic/copy.yaml'}",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--data.init_args.train_size=160", "--data.init_args.val_size=16",
        "--data.init_args.batch_size=8", "--model.init_args.model.init_args.hidden_size=8",
        "--model.init_args.model.init_args.embedding_size=4"]  # fmt: skip
STEPS = 10
# checkpoints (last.ckpt among them) after every step, mid-epoch, where ModelCheckpoint saves;
# without a monitor: val/loss exists only after a validation
EVERY_STEP = ["--checkpoint.every_n_train_steps=1", "--checkpoint.monitor=null"]


# ---- the child process ----------------------------------------------------------------------


class Child:
    """`rnndrop` in a subprocess (this checkout's code), its stderr read line by line."""

    def __init__(self, argv: list[str], cwd: Path, **env: str) -> None:
        environ = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(TESTS.parent), os.environ.get("PYTHONPATH", "")]), **env}  # fmt: skip
        self.proc = subprocess.Popen([sys.executable, str(CHILD), *argv], cwd=cwd, env=environ,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)  # fmt: skip
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, prefix: str, timeout: float = 120) -> str:
        """The first stderr line starting with ``prefix`` (fails if the child ends first)."""
        while True:
            try:
                line = self._queue.get(timeout=timeout)
            except queue.Empty:
                self.proc.kill()
                raise AssertionError(f"no {prefix!r} within {timeout} s:\n" + self.log()) from None
            if line is None:
                raise AssertionError(f"the child ended without {prefix!r}:\n" + self.log())
            self.lines.append(line)
            if line.startswith(prefix):
                return line

    def finish(self, timeout: float = 120) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        while (line := self._queue.get(timeout=timeout)) is not None:
            self.lines.append(line)
        return rc

    def log(self) -> str:
        return "\n".join(self.lines[-40:])


def run_child(tmp: Path, *extra: str, **env: str) -> Child:
    return Child([*TINY, f"--trainer.default_root_dir={tmp / 'root'}", *EVERY_STEP, *extra],
                 tmp, **env)  # fmt: skip


def losses(path: Path) -> dict[int, str]:
    """``{global step: loss.hex()}`` as the child recorded them."""
    return {int(s): v for s, v in (line.split() for line in path.read_text().splitlines())}


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, str]:
    """The loss curve of an uninterrupted run of STEPS steps."""
    tmp = tmp_path_factory.mktemp("reference")
    child = run_child(tmp, f"--trainer.max_steps={STEPS}", FAULT_LOSSES=str(tmp / "losses.txt"))
    assert child.finish() == 0, child.log()
    curve = losses(tmp / "losses.txt")
    assert sorted(curve) == list(range(1, STEPS + 1))
    return curve


def resume_and_compare(tmp: Path, ckpt: Path, reference: dict[int, str]) -> int:
    """Resume from ``ckpt`` to STEPS; the curve after it must equal the reference, bit for bit.
    Returns the checkpoint's step."""
    step = load(ckpt)["global_step"]
    assert 0 < step < STEPS
    out = tmp / "resumed.txt"
    child = run_child(tmp, f"--trainer.max_steps={STEPS}", f"--ckpt_path={ckpt}",
                      FAULT_LOSSES=str(out))  # fmt: skip
    assert child.finish() == 0, child.log()
    resumed = losses(out)
    assert sorted(resumed) == list(range(step + 1, STEPS + 1))
    assert resumed == {s: reference[s] for s in resumed}
    return step


def checkpoints(tmp: Path) -> list[Path]:
    return sorted((tmp / "root").rglob("*.ckpt"))


# ---- 1. atomic writes: a kill during a save --------------------------------------------------


@pytest.fixture
def foreign_tmpdir(tmp_path):
    """``{"TMPDIR": ...}`` on another filesystem than the checkpoints, where there is one.

    Lightning's own writer copies a temporary file from $TMPDIR over the checkpoint when they
    are on different filesystems (a node's /tmp, a shared checkpoint directory): the children
    below run that way where /dev/shm is another filesystem."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        yield {}
        return
    tmp = tempfile.mkdtemp(dir=shm)
    yield {"TMPDIR": tmp}
    shutil.rmtree(tmp, ignore_errors=True)


def kill_during_save(child: Child) -> str:
    """SIGKILL the child while it is held in the middle of writing a checkpoint."""
    try:
        paused = child.wait_for("PAUSED")  # 1 KiB of the checkpoint written, the rest held
        child.proc.send_signal(signal.SIGKILL)
        assert child.finish() == -signal.SIGKILL
    finally:
        child.proc.kill()
    return paused


@pytest.mark.parametrize("target, extra", [
    ("last.ckpt", []),
    ("best-", ["--checkpoint.monitor=train/loss", "--checkpoint.save_top_k=2"]),
])  # fmt: skip
def test_a_sigkill_during_a_save_leaves_checkpoints_that_load(target, extra, tmp_path,
                                                              foreign_tmpdir):  # fmt: skip
    child = run_child(tmp_path, f"--trainer.max_steps={STEPS}", *extra,
                      FAULT_PAUSE=f"{target}:2", **foreign_tmpdir)  # the second save  # fmt: skip
    assert str(tmp_path / "root") in kill_during_save(child)
    ckpts = checkpoints(tmp_path)
    assert any(p.name.startswith(target) for p in ckpts), ckpts  # the previous one
    for p in ckpts:
        ckpt = load(p)  # not torn
        assert ckpt["global_step"] >= 1 and ckpt["state_dict"], p


# ---- 2. resume after SIGKILL mid-epoch, bit for bit ------------------------------------------


def test_resume_after_a_sigkill_mid_epoch_continues_the_loss_curve_bit_for_bit(
    reference, tmp_path, foreign_tmpdir
):
    # the worst moment: during step 5's save of last.ckpt (saved after every step)
    child = run_child(tmp_path, f"--trainer.max_steps={STEPS}", FAULT_PAUSE="last.ckpt:5",
                      FAULT_LOSSES=str(tmp_path / "killed.txt"), **foreign_tmpdir)  # fmt: skip
    kill_during_save(child)
    killed = losses(tmp_path / "killed.txt")
    assert killed == {s: reference[s] for s in range(1, 6)}
    (last,) = [p for p in checkpoints(tmp_path) if p.name == "last.ckpt"]
    assert resume_and_compare(tmp_path, last, reference) == 4  # step 4's save, whole


# ---- 3. SIGTERM: save at the next step boundary, exit 143 --------------------------------------


def test_sigterm_saves_at_the_step_boundary_exits_143_and_resumes_bit_for_bit(reference, tmp_path):
    child = run_child(tmp_path, f"--trainer.max_steps={STEPS}",
                      "--checkpoint.every_n_train_steps=4", FAULT_HOLD="6")  # fmt: skip
    try:
        child.wait_for("HOLD 6")
        child.proc.send_signal(signal.SIGTERM)
        assert child.finish() == 128 + signal.SIGTERM, child.log()
    finally:
        child.proc.kill()
    (last,) = [p for p in checkpoints(tmp_path) if p.name == "last.ckpt"]
    said = [line for line in child.lines if "SIGTERM" in line and "rnndrop" in line]
    assert len(said) == 1 and f"--ckpt_path {last}" in said[0], child.log()
    assert "Traceback" not in child.log()
    # step 6 is no multiple of 4: the checkpoint is the SIGTERM's, at the step it arrived
    assert resume_and_compare(tmp_path, last, reference) == 6


# ---- 4. bad checkpoints: one line, exit 2 -----------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """The checkpoint directory of a 3-step run: last.ckpt, last_good.ckpt, a best."""
    root = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        main([*TINY, "--trainer.max_steps=3", f"--trainer.default_root_dir={root}",
              "--model.init_args.lr=0.01"])  # fmt: skip
    (ckpts,) = {p.parent for p in root.rglob("last.ckpt")}
    names = {p.name for p in ckpts.glob("*.ckpt")}
    assert {"last.ckpt", "last_good.ckpt"} <= names and any(n.startswith("best") for n in names)
    return ckpts


def resume(tmp_path: Path, ckpt: Path, *extra: str) -> list[str]:
    return [*TINY, "--trainer.max_steps=4", "--model.init_args.lr=0.01", f"--ckpt_path={ckpt}",
            f"--trainer.default_root_dir={tmp_path / 'again'}", *extra]  # fmt: skip


def beside(trained: Path, tmp_path: Path, name: str = "last.ckpt") -> Path:
    """A copy of the run's checkpoint directory without ``name``; ``name``'s path in it."""
    copy = tmp_path / "checkpoints"
    shutil.copytree(trained, copy)
    (copy / name).unlink()
    return copy / name


def test_a_missing_checkpoint_is_one_line_pointing_at_the_sound_ones(trained, tmp_path, capsys):
    gone = beside(trained, tmp_path)
    line = error_line(resume(tmp_path, gone), capsys)
    assert line.startswith("error: --ckpt_path: ") and str(gone) in line and "no such file" in line
    assert f"--ckpt_path {gone.parent / 'last_good.ckpt'}" in line, line
    assert not (tmp_path / "again").exists()
    line = error_line(resume(tmp_path, tmp_path / "nowhere" / "x.ckpt"), capsys)
    assert "x.ckpt: no such file" in line and "sound" not in line


def test_a_torn_checkpoint_is_one_line_naming_it_and_the_sound_ones(trained, tmp_path, capsys):
    torn = beside(trained, tmp_path)
    torn.write_bytes((trained / "last.ckpt").read_bytes()[:5000])  # what a kill mid-write leaves
    line = error_line(resume(tmp_path, torn), capsys)
    assert str(torn) in line and "not a readable checkpoint" in line and "5000 bytes" in line
    assert "last_good.ckpt" in line and "best-" in line, line


@pytest.mark.parametrize("content, problem", [
    (b"not a checkpoint at all\n", "not a readable checkpoint"),
    ({"weights": torch.zeros(2)}, "not a Lightning checkpoint"),
])  # fmt: skip
def test_a_file_that_is_not_a_checkpoint_is_one_line(content, problem, tmp_path, capsys):
    path = tmp_path / "other.ckpt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    line = error_line(resume(tmp_path, path), capsys)
    assert str(path) in line and problem in line


def test_a_checkpoint_from_a_newer_rnndrop_is_refused(trained, tmp_path, capsys):
    ckpt = load(trained / "last.ckpt")
    ckpt["rnndrop"]["version"] = "99.0"
    path = tmp_path / "future.ckpt"
    torch.save(ckpt, path)
    line = error_line(resume(tmp_path, path), capsys)
    assert str(path) in line and "rnndrop 99.0, newer than this rnndrop" in line


@pytest.mark.parametrize("extra, names", [
    (["--data.init_args.task=adding"], ["task adding", "checkpoint's copy"]),
    (["--model.init_args.model.init_args.encoder=gru"], ["encoder gru", "checkpoint's lstm"]),
    (["--model.init_args.optimizer=sgd"], ["optimizer sgd", "checkpoint's adam"]),
])  # fmt: skip
def test_a_checkpoint_of_another_task_or_model_is_refused(extra, names, trained, tmp_path,
                                                          capsys):  # fmt: skip
    line = error_line(resume(tmp_path, trained / "last.ckpt", *extra), capsys)
    assert str(trained / "last.ckpt") in line and "conflicts" in line
    for name in names:
        assert name in line, line


def test_a_checkpoint_of_another_task_class_is_refused(trained, tmp_path, capsys):
    ckpt = load(trained / "last.ckpt")
    ckpt["hyper_parameters"]["_class_path"] = "rnndrop.lit.LanguageModelTask"
    path = tmp_path / "lm.ckpt"
    torch.save(ckpt, path)
    line = error_line(resume(tmp_path, path), capsys)
    assert (
        "task class: the checkpoint's is rnndrop.lit.LanguageModelTask, this run's "
        "rnndrop.lit.SequenceTask" in line
    ), line


# ---- 5. no silent override --------------------------------------------------------------------


def test_an_explicit_setting_that_contradicts_the_checkpoint_is_refused_naming_both(
    trained, tmp_path, capsys
):
    # the run was trained with 8 units (TINY): 32 would be silently replaced by 8
    line = error_line(
        resume(tmp_path, trained / "last.ckpt", "--model.init_args.model.init_args.hidden_size=32"),
        capsys,
    )
    assert "hidden_size 32 (--model.init_args.model.init_args.hidden_size)" in line, line
    assert "against the checkpoint's 8" in line
    # a preset name is compared by what it means, not by its spelling
    line = error_line(
        resume(
            tmp_path, trained / "last.ckpt", "--model.init_args.model.init_args.dropout=variational"
        ),
        capsys,
    )
    assert "dropout" in line and "'recurrent': 0.25" in line and "'recurrent': 0.1" in line


def test_resumable_settings_may_change(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(resume(tmp_path, trained / "last.ckpt", "--model.init_args.lr_decay=0.5",
                "--trainer.max_steps=5", "--trainer.log_every_n_steps=1"))  # fmt: skip
    (last,) = (tmp_path / "again").rglob("last.ckpt")
    ckpt = load(last)
    assert ckpt["global_step"] == 5
    assert ckpt["hyper_parameters"]["lr_decay"] == 0.5  # the given value, not the checkpoint's 1.0
    assert ckpt["lr_schedulers"], "lr_decay < 1 adds the decay schedule"


# ---- 6. disk full -------------------------------------------------------------------------------


def test_a_full_disk_keeps_the_previous_checkpoint_and_stops_with_one_line(
    tmp_path, monkeypatch, capsys
):
    real_save, saves = torch.save, []

    def full_disk(obj, f, *args, **kwargs):
        name = str(getattr(f, "name", f))
        if "last.ckpt" in name:
            saves.append(name)
            if len(saves) == 3:  # the third last.ckpt: half of it fits, then the disk is full
                buffer = io.BytesIO()
                real_save(obj, buffer)
                f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(
            [*TINY, "--trainer.max_steps=6", f"--trainer.default_root_dir={tmp_path}", *EVERY_STEP]
        )
    err = capsys.readouterr().err
    assert info.value.code == 1 and "Traceback" not in err, err
    (line,) = [line for line in err.splitlines() if "cannot save checkpoint" in line]
    (last,) = tmp_path.rglob("last.ckpt")
    assert str(last) in line and "No space left on device" in line and "intact" in line
    assert load(last)["global_step"] == 2  # the previous save, whole
    assert not [p for p in last.parent.iterdir() if p.name.startswith(".")], "temporary files"


# ---- the other atomic writes: the studies' result.json -----------------------------------------


def test_result_json_is_fsynced_before_the_rename_and_a_failed_write_keeps_the_old(
    tmp_path, monkeypatch
):
    from rnndrop.study.common import write_json

    path = tmp_path / "result.json"
    write_json(path, {"status": "ok"})
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(("fsync", fd)) or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: calls.append(("replace", Path(b)))
                        or real_replace(a, b))  # fmt: skip
    write_json(path, {"status": "new"})
    assert [c[0] for c in calls] == ["fsync", "replace", "fsync"]  # file, rename, directory
    assert calls[1][1] == path and json.loads(path.read_text()) == {"status": "new"}

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError):
        write_json(path, {"status": "lost"})
    assert json.loads(path.read_text()) == {"status": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


# ---- 3b. the SLURM requeue pattern --------------------------------------------------------------


def test_the_slurm_script_passes_sigterm_on_requeues_on_143_and_resumes(tmp_path):
    """experiments/long_range/slurm.sh with FIT_ARGS, with stand-ins for `rnndrop` (exits 143
    on SIGTERM, as `rnndrop fit` does) and `scontrol` on the PATH."""
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    (bin_dir / "rnndrop").write_text(
        '#!/usr/bin/env bash\necho "rnndrop $*" >> "$LOG"\ntrap \'exit 143\' TERM\n'
        "echo ready >&2\nwhile true; do sleep 0.05; done\n"
    )
    (bin_dir / "scontrol").write_text('#!/usr/bin/env bash\necho "scontrol $*" >> "$LOG"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    root = tmp_path / "root"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "LOG": str(log),
           "FIT_ARGS": "--config a.yaml", "FIT_ROOT": str(root), "SLURM_JOB_ID": "42"}  # fmt: skip
    for attempt in range(2):
        if attempt:  # the first job left a checkpoint: the requeued one resumes from it
            (root / "checkpoints").mkdir(parents=True)
            (root / "checkpoints" / "last.ckpt").write_bytes(b"")
        script = subprocess.Popen(["bash", str(EXP / "long_range/slurm.sh")], env=env,
                                  stderr=subprocess.PIPE, text=True,
                                  start_new_session=True)  # fmt: skip
        try:
            assert script.stderr.readline().strip() == "ready"
            script.send_signal(signal.SIGTERM)  # what --signal=B:TERM@120 sends the script
            assert script.wait(timeout=30) == 143
        finally:  # nothing left behind holding the pipe, whatever happened
            with contextlib.suppress(ProcessLookupError):
                os.killpg(script.pid, signal.SIGKILL)
            script.wait()
    calls = log.read_text().splitlines()
    fit = f"rnndrop fit --config a.yaml --trainer.default_root_dir {root} --checkpoint.dirpath "
    assert calls == [f"{fit}checkpoints", "scontrol requeue 42",
                     f"{fit}checkpoints --ckpt_path {root}/checkpoints/last.ckpt",
                     "scontrol requeue 42"]  # fmt: skip
