"""`python -m vpt_cli` is the same as the `vpt` command."""
from vpt_cli.cli.app import app

app(prog_name="vpt")
