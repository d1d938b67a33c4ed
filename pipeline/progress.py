"""Progress of long loops, for a person at a terminal and for a log file alike.

At a terminal: tqdm's bar. Anywhere else (`dvc repro`, CI, `nohup pipeline ... > run.log`), where a bar would be
one endless line of carriage returns, a loop that runs longer than PIPELINE_PROGRESS_SECONDS (default 60 s)
writes one plain, timestamped line per interval with its count, rate and ETA, and a last line when it ends;
shorter loops write nothing. PIPELINE_PROGRESS_SECONDS=0 switches the lines off.
"""
from __future__ import annotations

import re
import sys
import time

from tqdm import tqdm

from pipeline.settings import EnvironmentVariable

SECONDS_VARIABLE = "PIPELINE_PROGRESS_SECONDS"
DEFAULT_SECONDS = 60.0
PROGRESS_SECONDS = EnvironmentVariable(SECONDS_VARIABLE, DEFAULT_SECONDS, "seconds between progress lines; 0 "
                                       "switches them off")
KNOWN_TOTAL = "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%), {rate_fmt}, {elapsed} elapsed, ETA {remaining}{postfix}"
UNKNOWN_TOTAL = "{desc}: {n_fmt} {unit}, {rate_fmt}, {elapsed} elapsed{postfix}"


def line_interval() -> float:
    """Seconds between two progress lines when stderr is not a terminal (0: no lines)."""
    return PROGRESS_SECONDS.value()


def progress_bar(iterable=None, *, show: bool = True, **options) -> tqdm:
    """`tqdm(iterable, **options)` fitted to where stderr goes: a bar at a terminal, timed lines elsewhere,
    nothing when `show` is false (another rank's copy, a quiet call)."""
    if not show:
        return tqdm(iterable, disable=True, **options)
    if sys.stderr.isatty():
        return tqdm(iterable, **options)
    seconds = line_interval()
    if seconds == 0:
        return tqdm(iterable, disable=True, **options)
    return ProgressLines(iterable, mininterval=seconds, maxinterval=seconds, delay=seconds, **options)


class ProgressLines(tqdm):
    """tqdm that writes whole lines: one per `mininterval` once the loop has run that long, and a final one
    (count, overall rate) at the end of a loop that wrote any. No carriage returns, no bar."""

    def __init__(self, *args, **options):
        self._last_line = None
        options.pop("leave", None)
        super().__init__(*args, leave=False, **options)

    def set_postfix(self, ordered_dict=None, refresh=True, **values):
        # tqdm redraws on every call; a log gets the new values with the next timed line
        super().set_postfix(ordered_dict, refresh=False, **values)

    def set_description(self, desc=None, refresh=True):
        super().set_description(desc, refresh=False)

    def display(self, msg=None, pos=None):
        if msg == "":  # tqdm clearing the bar on close: nothing to clear in a log
            return False
        values = dict(self.format_dict)
        values["bar_format"] = KNOWN_TOTAL if values.get("total") else UNKNOWN_TOTAL
        line = re.sub(" +", " ", self.format_meter(**values))  # tqdm pads rates with spaces
        if line != self._last_line:
            self.fp.write(f"[{time.strftime('%H:%M:%S')}] {line}\n")
            self.fp.flush()
            self._last_line = line
        return True

    def close(self):
        if not self.disable and self._last_line is not None:
            self._ema_dt = lambda: None  # the overall rate, not the recent one
            self.display()
        super().close()
