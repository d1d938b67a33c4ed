"""Stage `synthesize`: write the embedded synthetic face benchmark (train.rec, val.bin, test.rec)."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.synthetic import synthesize


def command(
    out: Path = typer.Option(..., "--out", help="Folder to write train.rec/.idx/property, val.bin, test.rec/.idx."),
    identities: int = typer.Option(2000, help="Training identities (labels 0..identities-1)."),
    images_per_identity: int = typer.Option(
        40, help="Images per training identity (the mean when --long-tail is on)."),
    size: int = typer.Option(112, help="Image side in pixels (112 as insightface; 32-48 for a quick CPU demo)."),
    seed: int = typer.Option(0, help="Master seed: the same arguments give bit-identical files."),
    difficulty: float = typer.Option(
        0.5, min=0.0, max=1.0,
        help="0..1: nuisance strength (pose, light, blur, noise, occluders, JPEG) and identity similarity."),
    val_identities: int = typer.Option(300, help="Held-out identities for val.bin (at least 20)."),
    val_pairs: int = typer.Option(6000, help="val.bin pairs: 10 folds, half positive (a multiple of 20)."),
    test_identities: int = typer.Option(500, help="Held-out identities for test.rec (labels 0..T-1)."),
    test_images_per_identity: int = typer.Option(6, help="Images per test identity (all-pairs 1:1 evaluation)."),
    long_tail: bool = typer.Option(
        False, "--long-tail/--no-long-tail",
        help="Log-normal images per identity, MS1M-like, clipped to [max(2, mean/5), 10*mean]."),
    workers: int = typer.Option(1, help="Rendering processes; the output does not depend on it."),
) -> None:
    """Render procedural identities and write them in the insightface formats."""
    summary = synthesize(
        out, identities=identities, images_per_identity=images_per_identity, size=size, seed=seed,
        difficulty=difficulty, val_identities=val_identities, val_pairs=val_pairs,
        test_identities=test_identities, test_images_per_identity=test_images_per_identity,
        long_tail=long_tail, workers=workers,
    )
    train, val, test = summary["train"], summary["val"], summary["test"]
    typer.echo(f"wrote {out}/train.rec, train.idx, property: {train['images']} images of {train['identities']} "
               f"identities ({train['min_images']}-{train['max_images']} each), {size}x{size}")
    typer.echo(f"wrote {out}/val.bin, val_pairs.csv: {val['pairs']} pairs ({val['positive_pairs']} positive) "
               f"in {val['folds']} folds over {val['identities']} held-out identities")
    typer.echo(f"wrote {out}/test.rec, test.idx: {test['images']} images of {test['identities']} identities, "
               f"{test['positive_pairs']} positive / {test['negative_pairs']} negative pairs")
    typer.echo(f"wrote {out}/synthetic.json ({summary['seconds']} s, {summary['images_per_second']} images/s)")


COMMANDS = {"synthesize": command}
