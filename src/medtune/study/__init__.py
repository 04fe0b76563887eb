"""``medtune study``: is pretraining worth it on *this* data? Every source at every label budget, seeds, paired CIs."""

from medtune.study.plan import ArmSpec, Budget, Run, parse_budgets, parse_sources, plan_runs

__all__ = ["ArmSpec", "Budget", "Run", "parse_budgets", "parse_sources", "plan_runs", "run_study"]


def run_study(*args, **kwargs):
    """See :func:`medtune.study.runner.run_study` (imported lazily: it needs torch)."""
    from medtune.study.runner import run_study as _run

    return _run(*args, **kwargs)
