"""The `vpt` command: a thin Typer layer over vpt_cli.api."""
