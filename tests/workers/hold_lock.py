"""Hold the advisory lock of an output, as a writer in the middle of its work would, until killed.

Run as `python tests/workers/hold_lock.py OUTPUT`: takes `pipeline.storage.io.output_lock(OUTPUT)`, prints "locked"
and sleeps. The tests start it, wait for the line, try a second writer, then kill it.
"""
from __future__ import annotations

import sys
import time

from pipeline.storage.io import output_lock

if __name__ == "__main__":
    with output_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(600)
