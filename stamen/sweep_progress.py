"""Progress of a running study: the reporter hooks and the rich progress display."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stamen.sweep import StudyResult
    from stamen.sweep_points import Study
    from stamen.sweep_run import Plan


class SweepReporter:
    """Hooks for progress: override any of them (the default does nothing)."""

    def study_started(self, study: Study, plans: list[Plan]) -> None: ...
    def point_started(self, plan: Plan) -> None: ...
    def point_round(self, point_id: str, row: dict[str, Any]) -> None: ...
    def point_finished(self, plan: Plan, summary: dict[str, Any]) -> None: ...
    def point_failed(self, plan: Plan, error: str) -> None: ...
    def study_finished(self, result: "StudyResult") -> None: ...


class RichSweepReporter(SweepReporter):
    """A rich progress display: the study's points, and one bar (rounds, accuracy) per running point."""

    def __init__(self, console):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = console
        self.progress = Progress(TextColumn("{task.description}"), MofNCompleteColumn(), BarColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console)
        self._bars: dict[str, Any] = {}
        self._overall = None
        self._skipped = self._failed = 0

    def __enter__(self) -> "RichSweepReporter":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def study_started(self, study: Study, plans: list[Plan]) -> None:
        self._skipped = sum(p.action == "skip" for p in plans)
        self._overall = self.progress.add_task(f"[bold]{study.name}[/] points", total=len(plans),
                                               completed=self._skipped, info=self._info())

    def _info(self) -> str:
        return f"{self._skipped} finished before" + (f", [red]{self._failed} failed[/]" if self._failed else "")

    def point_started(self, plan: Plan) -> None:
        note = f" (resumed {plan.reason})" if plan.action == "resume" else ""
        self._bars[plan.point.id] = self.progress.add_task(
            f"  {plan.point.id}", total=plan.point.cfg.run.rounds, completed=plan.from_round, info=f"starting{note}")

    def point_round(self, point_id: str, row: dict[str, Any]) -> None:
        bar = self._bars.get(point_id)
        if bar is not None:
            acc = row.get("test_accuracy")
            self.progress.update(bar, completed=row.get("round") or 0, info=f"acc {acc:.4f}" if acc is not None else "")

    def _end(self, plan: Plan, text: str) -> None:
        bar = self._bars.pop(plan.point.id, None)
        if bar is not None:
            self.progress.remove_task(bar)
        self.progress.console.print(text)
        if self._overall is not None:
            self.progress.update(self._overall, advance=1, info=self._info())

    def point_finished(self, plan: Plan, summary: dict[str, Any]) -> None:
        acc = summary.get("final_test_accuracy")
        acc_text = f"{acc:.4f}" if isinstance(acc, (int, float)) else "n/a"
        self._end(plan, f"[green]done[/] {plan.point.id}  final accuracy {acc_text}")

    def point_failed(self, plan: Plan, error: str) -> None:
        self._failed += 1
        self._end(plan, f"[red]failed[/] {plan.point.id}: {error}")
