"""Distributed studies: three `tune run` workers on one real PostgreSQL server, one killed."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
from conftest import write_spec

ROOT = Path(__file__).resolve().parents[1]
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def _as_postgres(cmd: list[str]) -> list[str]:
    """initdb and postgres refuse to run as root: drop to the postgres user when we are root."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture(scope="module")
def postgres_url():
    bin_dir = _pg_bin()
    try:
        import psycopg  # noqa: F401  (the driver SQLAlchemy uses for postgresql:// URLs)
    except ImportError:
        bin_dir = None
    if bin_dir is None:
        message = "needs a PostgreSQL server (apt-get install postgresql) and psycopg (ovss-tune[postgres])"
        if os.environ.get("OVSS_REQUIRE_POSTGRES"):  # CI installs both: never skip there
            pytest.fail(message)
        pytest.skip(message)
    root = Path(tempfile.mkdtemp(prefix="ovss-pg-"))
    data = root / "data"
    os.chmod(root, 0o755)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run(_as_postgres([str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"]),
                   check=True, capture_output=True)
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c max_connections=300"
    subprocess.run(_as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options,
                                 "-l", str(root / "log"), "-w", "start"]), check=True, capture_output=True)
    try:
        subprocess.run([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                        "tune"], check=True, capture_output=True)
        yield f"postgresql://postgres@127.0.0.1:{port}/tune"
    finally:
        subprocess.run(_as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def test_three_workers_one_killed_reach_the_exact_trial_count(tmp_path, tiny_blip, tiny_clip, postgres_url):
    trials = 8
    spec = write_spec(tmp_path, tiny_blip, tiny_clip, images=4, trials=trials)
    command = [sys.executable, "-m", "tuner.cli", "run", "--study-file", str(spec), "--storage", postgres_url,
               "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--no-progress",
               "--heartbeat", "1", "--study", "dist"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
               for _ in range(3)]
    victim, before = workers[0], {}
    deadline = time.time() + 240
    try:
        while time.time() < deadline and victim.poll() is None:
            time.sleep(0.2)
            try:
                study = optuna.load_study(study_name="dist", storage=postgres_url)
            except KeyError:
                continue
            done = study.get_trials(deepcopy=False, states=FINISHED)
            running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
            if len(done) >= 2 and len(running) >= 3:  # every worker is inside a trial
                victim.send_signal(signal.SIGKILL)
                victim.wait()
                before = {t.number: t.value for t in done}
                break
        assert victim.returncode == -signal.SIGKILL, "the victim worker was not caught mid-trial"
        for worker in workers[1:]:
            worker.wait(timeout=max(1, deadline - time.time()))
            assert worker.returncode == 0, worker.stderr.read().decode()[-2000:]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    study = optuna.load_study(study_name="dist", storage=postgres_url)
    done = study.get_trials(deepcopy=False, states=FINISHED)
    assert len(done) == trials  # exact, although three workers raced for the last ones
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers))
    assert all(study.trials[n].value == v for n, v in before.items())  # nothing finished was lost
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL
              and not t.user_attrs.get("surplus")]
    assert len(failed) == 1  # the killed worker's trial, failed by its stale heartbeat ...
    retried = [t for t in done if t.system_attrs.get("failed_trial") == failed[0].number]
    assert len(retried) == 1 and retried[0].params == failed[0].params  # ... and finished by another
