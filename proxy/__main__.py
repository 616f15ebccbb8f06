"""`python -m proxy` is the `tokenproxy` command."""

from .cli import main

main(prog_name="tokenproxy")
