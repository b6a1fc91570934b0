"""`python -m steer` runs the `steer` command line."""

from steer.cli.main import main

main(prog_name="steer")
