"""Stage `synthesize`: write the embedded synthetic face benchmark (train.rec, val.bin, test.rec, and the
IJB-layout set ijb/IJBC/ when asked for)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.synthetic.writer import SyntheticConfig, synthesize
from stages import options


def synthesize_command(
    out: Annotated[Path, typer.Option("--out", help="Folder to write train.rec/.idx/property, val.bin, test.rec/.idx.")],
    cfg: SyntheticConfig,
) -> None:
    """Render procedural identities and write them in the insightface formats."""
    summary = synthesize(out, cfg)
    train, val, test = summary["train"], summary["val"], summary["test"]
    typer.echo(f"wrote {out}/train.rec, train.idx, property: {train['images']} images of {train['identities']} "
               f"identities ({train['min_images']}-{train['max_images']} each), {cfg.size}x{cfg.size}")
    typer.echo(f"wrote {out}/val.bin, val_pairs.csv: {val['pairs']} pairs ({val['positive_pairs']} positive) "
               f"in {val['folds']} folds over {val['identities']} held-out identities")
    typer.echo(f"wrote {out}/test.rec, test.idx: {test['images']} images of {test['identities']} identities, "
               f"{test['positive_pairs']} positive / {test['negative_pairs']} negative pairs")
    if "ijb" in summary:
        ijb = summary["ijb"]
        typer.echo(f"wrote {out}/ijb/{ijb['target']}/ (meta/, loose_crop/): {ijb['images']} crops ({ijb['video_frames']} "
                   f"video frames) in {ijb['templates']} templates of {ijb['identities']} identities, {ijb['pairs']} "
                   f"template pairs ({ijb['positive_pairs']} genuine)")
    typer.echo(f"wrote {out}/synthetic.json ({summary['seconds']} s, {summary['images_per_second']} images/s)")


COMMANDS = {"synthesize": options.command(synthesize_command, cfg=SyntheticConfig)}
