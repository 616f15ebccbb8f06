"""`python -m proxy` is the `tokenproxy` command."""

from .cli.main import main

main(prog_name="tokenproxy")
