"""Rich progress for `tune run`: images within a trial, trials, best value so far."""

from __future__ import annotations

import time

import optuna
from optuna.trial import TrialState
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class StudyProgress:
    """Two bars (trials, images of the current trial) and the best value in the trials line."""

    def __init__(self, runner, enabled: bool = True, console: Console | None = None) -> None:
        self.runner = runner
        self.enabled = enabled
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=self.console, disable=not enabled, transient=False,
        )
        self.n_images = len(runner.images)
        self._waiting_for: set[int] = set()

    def __enter__(self) -> StudyProgress:
        self.progress.__enter__()
        done = self.runner.finished()
        self.trials = self.progress.add_task(self._trials_text(), total=self.runner.trials, completed=done)
        self.images = self.progress.add_task("  images", total=self.n_images)
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def _trials_text(self) -> str:
        study = self.runner.study
        try:
            if len(study.directions) > 1:
                return f"trials (Pareto front {len(study.best_trials)})"
            return f"trials (best {study.best_value:.4g})"
        except ValueError:
            return "trials"

    def image_done(self, count: int) -> None:
        self.progress.update(self.images, completed=count)

    def trial_done(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        finished = self.runner.finished()
        self.progress.update(self.trials, completed=finished, description=self._trials_text())
        self.progress.update(self.images, completed=0)
        repeat_of = trial.user_attrs.get("repeat_of")
        if repeat_of is not None:
            self.progress.console.print(f"  trial {trial.number} repeats trial {repeat_of}'s config: not "
                                        "evaluated again, not counted", style="dim")
        elif trial.state == TrialState.PRUNED:
            self.progress.console.print(f"  trial {trial.number} pruned", style="dim")
        elif trial.state == TrialState.FAIL and trial.user_attrs.get("fail_reason"):
            self.progress.console.print(f"  trial {trial.number} failed: {trial.user_attrs['fail_reason']}",
                                        style="yellow", highlight=False)

    def waiting(self, running: list[optuna.trial.FrozenTrial]) -> None:
        """Say once per trial that this worker waits for it (printed even without progress bars)."""
        numbers = {t.number for t in running}
        new = [t for t in running if t.number not in self._waiting_for]
        self._waiting_for = numbers
        if not new:
            return
        beat = self.runner.options.heartbeat
        for t in new:
            since = "" if t.datetime_start is None else \
                f", running for {time.time() - t.datetime_start.timestamp():.0f} s"
            self.console.print(
                f"waiting for trial {t.number} (worker {t.user_attrs.get('worker', '?')}{since}); if "
                f"that worker is dead, its trial is failed and retried after {3 * beat} s without a "
                "heartbeat", highlight=False, style="dim")
