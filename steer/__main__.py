"""`python -m steer` runs the `steer` command line."""

from steer.cli.main import main

if __name__ == "__main__":
    main(prog_name="steer")
