"""`python -m retformer`: the command line (as the `retformer` console script)."""

from retformer.pipelines.cli import main

if __name__ == "__main__":
    main()
