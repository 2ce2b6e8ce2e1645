"""``python -m batchpool``: the command line, as the ``batchpool`` script runs it."""

from batchpool.cli import main

if __name__ == "__main__":
    main(prog_name="batchpool")
