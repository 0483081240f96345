"""What a task type optimises and reports: an `Objective` per task type (`single_label`,
`multi_label`), listed by name in a registry that imports no torch (`base`); `balance` holds the
class balance."""
from vpt_cli.objectives.base import (
    MULTI_LABEL,
    SINGLE_LABEL,
    Answer,
    Objective,
    is_multi_label,
    objective_class,
    objective_names,
)

__all__ = ["MULTI_LABEL", "SINGLE_LABEL", "Answer", "Objective", "is_multi_label", "objective_class",
           "objective_names"]
