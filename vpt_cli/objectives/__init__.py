"""What a task type optimises and reports: an `Objective` per task type (`single_label`, ...),
listed by name in a registry that imports no torch (`base`); `balance` holds the class balance."""
from vpt_cli.objectives.base import SINGLE_LABEL, Answer, Objective, objective_class, objective_names

__all__ = ["SINGLE_LABEL", "Answer", "Objective", "objective_class", "objective_names"]
