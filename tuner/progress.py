"""Rich progress for `tune run`: images within a trial, trials, best value so far."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class StudyProgress:
    """Two bars (trials, images of the current trial) and the best value in the trials line."""

    def __init__(self, runner, enabled: bool = True, console: Console | None = None) -> None:
        self.runner = runner
        self.enabled = enabled
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=console or Console(stderr=True), disable=not enabled, transient=False,
        )
        self.n_images = len(runner.images)

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
        if trial.state == TrialState.PRUNED:
            self.progress.console.print(f"  trial {trial.number} pruned", style="dim")
