"""`python -m pipeline`: the same entry point as the `pipeline` command (the top of the import graph)."""
from pipeline import cli

cli.main()
