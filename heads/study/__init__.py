"""Studies: a plan of heads and options, each cell trained (selection on val) and tested on the same
episodes as Dask tasks, reported as the paper's table with paired statistics and pictures.

    from heads.study import StudyOptions, load_plan, run_study
    summary = run_study(load_plan("ablation"), StudyOptions(store="stores/hmdb51", out="studies/ablation"))
"""

from ..stats import paired_comparison
from .folder import StudyError, read_per_episode
from .plans import Plan, PlanError, builtin_plans, load_plan
from .runner import StudyInterrupted, StudyOptions, run_study

__all__ = [
    "Plan",
    "PlanError",
    "StudyError",
    "StudyInterrupted",
    "StudyOptions",
    "builtin_plans",
    "load_plan",
    "paired_comparison",
    "read_per_episode",
    "run_study",
]
