"""`python -m vpt_cli` is the same as the `vpt` command."""
from vpt_cli.cli import app

app(prog_name="vpt")
