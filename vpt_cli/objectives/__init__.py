"""What a task type optimises and reports: an `Objective` per task type, registered by name."""
from vpt_cli.objectives.balance import ClassBalance
from vpt_cli.objectives.base import Answer, Objective, objective_class, objective_names, register_objective
from vpt_cli.objectives.single_label import SingleLabel  # registered first: the default task type

# isort: split
from vpt_cli.objectives.multi_label import MultiLabel, positive_weights

__all__ = ["Answer", "ClassBalance", "MultiLabel", "Objective", "SingleLabel", "objective_class", "objective_names",
           "positive_weights", "register_objective"]
