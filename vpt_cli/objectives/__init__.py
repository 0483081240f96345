"""What a task type optimises and reports: an `Objective` per task type, registered by name."""
from vpt_cli.objectives.balance import ClassBalance
from vpt_cli.objectives.base import Answer, Objective, objective_class, objective_names, register_objective
from vpt_cli.objectives.single_label import SingleLabel

__all__ = ["Answer", "ClassBalance", "Objective", "SingleLabel", "objective_class", "objective_names",
           "register_objective"]
