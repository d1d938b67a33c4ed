"""`python -m pipeline`: the same entry point as the `pipeline` command (the top of the import graph)."""
import sys

try:
    from pipeline import cli
except KeyboardInterrupt:  # Ctrl-C before cli.main's own guard: the same one line and exit code
    print("interrupted", file=sys.stderr)
    sys.exit(130)

cli.main()
