"""`pipeline inspect DATA`: what a face set holds (pipeline/formats/summary.py)."""
from __future__ import annotations

from pathlib import Path

import typer

from pipeline.formats.summary import format_summary, summarize


def command(
    data: Path = typer.Argument(
        ..., help="A face set: a folder with train.rec/train.idx/property (MS1MV2, Glint360K...), a RecordIO "
        "prefix such as data/test, or a folder with one sub-folder of images per identity."
    ),
) -> None:
    """Summarise a face set: images, identities, images per identity, layout, verification files."""
    print(format_summary(summarize(data)))


COMMANDS = {"inspect": command}
