"""`tf.distribute.MultiWorkerMirroredStrategy` with two worker processes on 127.0.0.1.

Each worker (tests/_multiworker_worker.py) feeds its own half of every
global batch through its own input pipeline
(`strategy.distribute_datasets_from_function`: no autosharding), trains with
stock `fit` (SGD, so a wrong gradient scale would show), a NaN pixel in one
worker's batch, and `keras.callbacks.BackupAndRestore` on a backup directory
both workers share. The test replays the same training in this process, on
one device, on the global batches, and compares:

* ActNorm's init inside `fit`: identical on both workers, equal to one
  process's `initialize` on the concatenated first batches;
* the weights after training: identical on both workers, equal to the
  one-process run; the same skipped steps, losses, `evaluate` and `log_prob`;
* a job whose chief is killed (SIGKILL, mid-epoch) and then restarted ends
  with the same weights as the uninterrupted run.

Workers run with one intra-op thread, on ports the OS picked, with bounded
waits; every process started here is killed in `finally`.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import _multiworker_worker as worker
import numpy as np
import pytest

# Worker processes on loopback (a minute or more on 2 cores): CI's slow step.
pytestmark = pytest.mark.slow

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_multiworker_worker.py")
JOB_TIMEOUT = 420  # seconds; a job takes ~25 s on 2 idle cores, minutes when they are shared


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class Job:
    """Two worker processes of one cluster, writing into `out_dir`."""

    def __init__(self, out_dir, backup_dir, sleep):
        self.out_dir, self.backup_dir = str(out_dir), str(backup_dir)
        os.makedirs(self.out_dir, exist_ok=True)
        ports = _free_ports(worker.WORKERS)
        cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
        self.procs = []
        for task in range(worker.WORKERS):
            config = {"cluster": cluster, "task": {"type": "worker", "index": task}}
            env = {**os.environ, "TF_CONFIG": json.dumps(config), "TF_CPP_MIN_LOG_LEVEL": "2"}
            with open(self.output(task), "w") as out:
                self.procs.append(
                    subprocess.Popen(
                        [sys.executable, WORKER, self.out_dir, self.backup_dir, str(sleep)],
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        env=env,
                    )
                )

    def output(self, task):
        return os.path.join(self.out_dir, f"worker_{task}.out")

    def log(self, task):
        path = os.path.join(self.out_dir, f"worker_{task}.log")
        return open(path).read().split() if os.path.exists(path) else []

    def result(self, task):
        return dict(np.load(os.path.join(self.out_dir, f"worker_{task}.npz")))

    def tails(self):
        return "\n".join(
            f"--- worker {t} (exit {p.poll()}):\n{open(self.output(t)).read()[-3000:]}"
            for t, p in enumerate(self.procs)
        )

    def wait(self, timeout=JOB_TIMEOUT):
        deadline = time.time() + timeout
        for p in self.procs:
            try:
                p.wait(timeout=max(deadline - time.time(), 1))
            except subprocess.TimeoutExpired:
                pytest.fail(f"the job did not finish in {timeout} s\n{self.tails()}")
        assert [p.returncode for p in self.procs] == [0] * len(self.procs), self.tails()

    def kill(self):
        for p in self.procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait(timeout=30)


_REFERENCE = {}


def _reference():
    """The same training in this process, on one device, on the global batches."""
    if not _REFERENCE:
        batches = worker.global_batches()
        probe = worker.build_model()
        probe.initialize(batches[0])
        _REFERENCE["initialize"] = worker.actnorm_values(probe)
        _REFERENCE["fit"] = worker.train(worker.build_model(), batches)
    return _REFERENCE


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiworker")
    job = Job(root / "run", root / "backup", sleep=0.0)
    try:
        reference = _reference()  # while the workers run
        job.wait()
        return (
            [job.result(t) for t in range(worker.WORKERS)],
            [job.log(t) for t in (0, 1)],
            reference,
            root,
        )
    finally:
        job.kill()


def _max_diff(a, b, prefix):
    keys = [k for k in a if k.startswith(prefix)]
    assert keys, prefix
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in keys)


def test_fit_initialises_actnorm_on_the_global_batch(uninterrupted):
    (w0, w1), _, reference, _ = uninterrupted
    assert int(w0["num_replicas"]) == int(w1["num_replicas"]) == 2
    keys = [k for k in w0 if k.startswith("init/")]
    # 4 ActNorms (2 levels x 2 steps), each with log_scale, bias, initialized.
    assert len(keys) == 12
    for k in keys:
        np.testing.assert_array_equal(w0[k], w1[k], err_msg=k)
        np.testing.assert_allclose(
            w0[k], reference["initialize"][k[len("init/") :]], rtol=0, atol=1e-4, err_msg=k
        )
    # The init really ran, and away from the identity it starts at.
    assert {float(w0[k]) for k in keys if w0[k].shape == ()} == {1.0}
    assert max(float(np.max(np.abs(w0[k]))) for k in keys if w0[k].shape != ()) > 0.5
    print(
        f"\n[multiworker] ActNorm init: workers differ by {_max_diff(w0, w1, 'init/'):.1e}, "
        f"from one-process initialize by "
        f"{max(float(np.max(np.abs(w0[k] - reference['initialize'][k[5:]]))) for k in keys):.1e}"
    )


def test_fit_trains_like_one_process_on_the_global_batches(uninterrupted):
    (w0, w1), logs, reference, _ = uninterrupted
    ref = reference["fit"]
    for log in logs:
        assert log.count("begin") == worker.EPOCHS and log[-1] == "done"
        assert log.count("batch") == worker.EPOCHS * worker.STEPS
    assert _max_diff(w0, w1, "weight/") == 0.0
    worst = _max_diff(w0, ref, "weight/")
    moved = max(
        float(np.max(np.abs(ref[k] - ref["start/" + k[len("weight/") :]])))
        for k in ref
        if k.startswith("weight/")
    )
    print(
        f"\n[multiworker] weights after {worker.EPOCHS * worker.STEPS} SGD steps: workers "
        f"differ by 0, from one process by {worst:.1e} (training moved them {moved:.2e}); "
        f"losses {w0['losses'].round(4).tolist()} vs {ref['losses'].round(4).tolist()}"
    )
    assert worst <= 1e-5
    assert moved > 1e-2  # training moved the weights far beyond the tolerance
    # The NaN pixel in worker 1's batch stopped that step on both workers.
    assert int(w0["nonfinite_steps"]) == int(w1["nonfinite_steps"]) == worker.EPOCHS
    assert int(ref["nonfinite_steps"]) == worker.EPOCHS
    assert all(np.isfinite(w0[k]).all() for k in w0 if k.startswith("weight/"))
    # What fit reports and what evaluate / log_prob give match one process.
    for w in (w0, w1):
        np.testing.assert_allclose(w["losses"], ref["losses"], rtol=0, atol=1e-4)
        np.testing.assert_allclose(w["eval_loss"], ref["eval_loss"], rtol=0, atol=1e-4)
        np.testing.assert_allclose(w["log_prob"], ref["log_prob"], rtol=0, atol=1e-4)
    assert ref["losses"][-1] < ref["losses"][0] - 1.0  # it learned something
    # The chief removed the shared backup when training ended.
    assert not (uninterrupted[3] / "backup").exists()
    # A plain pipeline with autosharding off makes fit warn on every worker.
    assert int(w0["off_warnings"]) == int(w1["off_warnings"]) == 1


def test_killed_worker_and_restarted_job_end_like_the_uninterrupted_run(uninterrupted, tmp_path):
    (u0, _), _, reference, _ = uninterrupted
    backup = tmp_path / "backup"
    victim = Job(tmp_path / "killed", backup, sleep=0.5)
    try:
        deadline = time.time() + JOB_TIMEOUT
        while time.time() < deadline:
            log = victim.log(0)
            # Epoch 1 (index 0) ended and was backed up; 2 batches into epoch 2.
            if "end" in log and " ".join(log).split("begin 1", 1)[-1].count("batch") >= 2:
                break
            assert all(p.poll() is None for p in victim.procs), victim.tails()
            time.sleep(0.05)
        else:
            pytest.fail(f"the job never reached the middle of epoch 2\n{victim.tails()}")
        chief, other = victim.procs
        os.kill(chief.pid, signal.SIGKILL)  # the worker that writes the backup
        chief.wait(timeout=30)
        assert chief.returncode == -signal.SIGKILL
        # The survivor's next collective fails ("Socket closed"); a cluster
        # manager would restart it anyway, so don't wait long for that.
        try:
            other.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.kill(other.pid, signal.SIGKILL)
            other.wait(timeout=30)
        assert other.returncode != 0
    finally:
        victim.kill()
    assert "end 1" not in " ".join(victim.log(0)) and "done" not in victim.log(0)
    with open(backup / "training_metadata.json") as f:
        assert json.load(f)["epoch"] == 1
    assert not (tmp_path / "killed" / "worker_0.npz").exists()

    # The same command again, on fresh ports: restores epoch 1's backup.
    resumed = Job(tmp_path / "resumed", backup, sleep=0.0)
    try:
        resumed.wait()
    finally:
        resumed.kill()
    r0, r1 = resumed.result(0), resumed.result(1)
    for task in range(worker.WORKERS):
        log = " ".join(resumed.log(task))
        assert log.startswith("begin 1 batch 0") and "begin 0" not in log, log
        assert log.count("begin") == worker.EPOCHS - 1 and log.endswith("done")
    assert _max_diff(r0, r1, "weight/") == 0.0
    worst = _max_diff(r0, u0, "weight/")
    print(
        f"\n[multiworker] killed + restarted vs uninterrupted: {worst:.1e}; vs one "
        f"process: {_max_diff(r0, reference['fit'], 'weight/'):.1e}"
    )
    assert worst <= 1e-6
    assert _max_diff(r0, reference["fit"], "weight/") <= 1e-5
    # The resumed fit initialised ActNorm again (then restored it) just the same.
    assert _max_diff(r0, u0, "init/") == 0.0
    assert not backup.exists()


# -- in this process: the pieces that need no cluster -------------------------


def test_multi_worker_strategy_needs_a_cluster(monkeypatch):
    from tfp_glow.training.distributed import multi_worker_strategy

    monkeypatch.delenv("TF_CONFIG", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(ValueError, match="set TF_CONFIG"):
        multi_worker_strategy()
    with pytest.raises(ValueError, match="`communication` must be one of"):
        multi_worker_strategy(communication="mpi")


def test_outside_multi_worker_mode_nothing_changes():
    import keras
    import tensorflow as tf

    from tfp_glow.training import distributed

    backup = keras.callbacks.BackupAndRestore("unused_dir")
    assert distributed.fit_callbacks(None) == []
    assert distributed.fit_callbacks(backup) == [backup]
    assert distributed.fit_callbacks((backup,))[0] is backup
    assert not distributed.in_multi_worker_mode() and distributed.is_chief()
    logs = {"loss": tf.constant(1.5)}
    assert distributed.step_logs(logs) is logs
    x = tf.random.stateless_normal([5, 3, 2], seed=[1, 2])
    mean, variance = distributed.global_moments(x, [0, 1])
    np.testing.assert_array_equal(mean, tf.nn.moments(x, [0, 1])[0])
    np.testing.assert_array_equal(variance, tf.nn.moments(x, [0, 1])[1])
    np.testing.assert_array_equal(distributed.global_sum(x), x)


def test_cli_multiworker_without_a_cluster_names_tf_config(monkeypatch, tmp_path, capsys):
    from tfp_glow import cli

    monkeypatch.delenv("TF_CONFIG", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    run = tmp_path / "run"
    code = cli.main(["train", "--strategy", "multiworker", "--epochs", "1", "--output", str(run)])
    assert code == 2
    err = capsys.readouterr().err
    assert "tfp-glow: error: Multi-worker training needs the cluster: set TF_CONFIG" in err
    assert not run.exists()  # refused before anything was written
