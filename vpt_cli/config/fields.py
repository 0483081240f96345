"""A setting is defined once: a config dataclass field whose metadata carries its command-line
flag, help and shown default. The CLI builds its options from this metadata
(vpt_cli.cli.options), the flag-to-key mapping comes from the same fields, and YAML files use
the field names. No Typer and no torch here."""
from __future__ import annotations

import dataclasses
from dataclasses import MISSING, Field
from typing import Any


def setting(default: Any = MISSING, *, flag: str | None = None, help: str, shown: str | None = None,
            choices: tuple[str, ...] | None = None, default_factory: Any = MISSING, path: bool = False) -> Any:
    """A config field. `flag`: its command-line flag (None: YAML only); `help`: one sentence for
    --help; `shown`: the default as --help words it when the value is computed later (None
    fields); `choices`: allowed values; `path`: a file path (the CLI takes a Path)."""
    metadata = {"flag": flag, "help": help, "shown": shown, "choices": choices, "path": path}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def shown_default(item: Field) -> str:
    """The default as --help shows it: the `shown` words, else the value itself."""
    if item.metadata.get("shown"):
        return item.metadata["shown"]
    if item.default is not MISSING:
        value = item.default
    elif item.default_factory is not MISSING:
        value = item.default_factory()
    else:
        return "required"
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)
