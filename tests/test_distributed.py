"""Distributed studies: three `tune run` workers on one real PostgreSQL server, one killed."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
import pytest
from conftest import kill_mid_trial, write_spec

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
    trials = 16
    spec = write_spec(tmp_path, tiny_blip, tiny_clip, images=6, trials=trials)
    command = [sys.executable, "-m", "tuner.cli", "run", "--study-file", str(spec), "--storage", postgres_url,
               "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--no-progress",
               "--heartbeat", "1", "--study", "dist"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def start():
        return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    alive = [start() for _ in range(3)]
    everyone = list(alive)
    try:
        for _attempt in range(5):  # kill one worker inside a trial (retry if the kill fell between two)
            victim = alive.pop(0)
            if kill_mid_trial(victim, postgres_url, "dist", min_done=2, timeout=240):
                break
            alive.append(start())
            everyone.append(alive[-1])
        else:
            pytest.fail("no worker was killed inside a trial")
        before = {t.number: t.value for t in optuna.load_study(study_name="dist", storage=postgres_url)
                  .get_trials(deepcopy=False, states=FINISHED)}
        for worker in alive:
            worker.wait(timeout=240)
            assert worker.returncode == 0, worker.stderr.read().decode()[-2000:]
    finally:
        for worker in everyone:
            if worker.poll() is None:
                worker.kill()
    study = optuna.load_study(study_name="dist", storage=postgres_url)
    done = [t for t in study.get_trials(deepcopy=False, states=FINISHED) if "repeat_of" not in t.user_attrs]
    assert len(done) == trials  # exact distinct configs, although three workers raced for the last ones
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers))
    assert all(study.trials[n].value == v for n, v in before.items())  # nothing finished was lost
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL
              and not t.user_attrs.get("surplus")]
    assert len(failed) == 1  # the killed worker's trial, failed by its stale heartbeat ...
    assert failed[0].user_attrs["worker"].endswith(f":{victim.pid}")
    # ... and finished by another, with the parameters it had drawn (recorded as a repeat when
    # another worker drew and finished the same config first: 16 draws from a 40-config space)
    retried = [t for t in study.get_trials(deepcopy=False, states=FINISHED)
               if t.system_attrs.get("failed_trial") == failed[0].number]
    assert len(retried) == 1  # with the parameters the killed trial had drawn (none if killed before)
    assert all(retried[0].params[k] == v for k, v in failed[0].params.items())
    assert failed[0].params.items() <= retried[0].params.items()
