"""`python -m clipsearch` runs the command line."""

from clipsearch.cli import run

if __name__ == "__main__":
    run()
