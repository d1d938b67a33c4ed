"""How closely trained students reproduce their teacher, on the training images and on the held-out test set.

Why the best students stop short of the teacher: if a student reproduces the teacher as well on the test
identities as on the training images it learnt from, it is not over-fitting its targets but cannot follow the
teacher any closer (its capacity or its optimisation is the limit); if it follows the teacher much better on
the training images, the limit is how far the fit generalises (more data would help).

For each model (flip-fused embeddings, as `pipeline evaluate`) and each set (`train` = train.rec or a fixed
random `--train-images` subset of it, `test` = test.rec):
- `tpr@1e-4` / `tpr@1e-5`: all-pairs verification on that set (the teacher's too: how far it memorised its
  training positives);
- `cos_to_teacher`: mean cosine between the student's and the teacher's embedding of the same image (feature
  fidelity; meaningful only where the method aligns the two spaces, not for a no-KD student);
- `pair_corr`: Pearson correlation between the student's and the teacher's similarities over the negative
  pairs of a fixed random subset of `--pairs-of` images (rotation-invariant: it compares the two similarity
  structures, which is what verification reads), and `pair_mae` the mean absolute difference on those pairs.

Runs are `--runs ROOT` folders ROOT/seedS/METHOD/model.pt (benchmarks/quality.py's layout); every figure is
the mean ± SE over seeds, and `train - test` is paired per seed. Prints ONE JSON line.

    python benchmarks/fidelity.py --data data/synthetic --teacher data/teacher/model.pt \\
        --runs benchmarks/out/quality/data-seed0 --methods baseline,ekd,l2 --seeds 1,2,3
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # arguments.py, also when imported from elsewhere
from arguments import (existing_file, folder_with, int_list, integer, names, parse_later,  # noqa: E402
                       positive_int, run_main)

from pipeline.evaluation.compare import mean_and_se, paired  # noqa: E402
from pipeline.evaluation.metrics import Roc  # noqa: E402
from pipeline.formats.recordio import FaceRecordIO  # noqa: E402

SETS = ("train", "test")
PAIRS_OF = 2000  # images whose negative pairs are correlated, by default


class Images:
    """The decoded images of a RecordIO set, or of the given rows of it (in that order)."""

    def __init__(self, path: Path, rows: int | None, rng: np.random.Generator):
        self.records = FaceRecordIO(path, require_property=False)
        labels = np.asarray(self.records.labels).reshape(-1)
        everything = rows is None or rows >= len(labels)
        self.rows = np.arange(len(labels)) if everything else np.sort(rng.choice(len(labels), rows, replace=False))
        self.labels = labels[self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.records.decode(int(self.rows[i]))


def image_sets(data: Path, train_images: int | None, pairs_of: int) -> tuple[dict[str, Images], dict[str, np.ndarray]]:
    """Each set's images (train: all, or a fixed random `train_images` of them) and the fixed random rows whose
    negative pairs are correlated (`pairs_of` of them), both drawn from one seeded generator."""
    rng = np.random.default_rng(0)
    images = {name: Images(data / f"{name}.rec", train_images if name == "train" else None, rng) for name in SETS}
    subset = {name: np.sort(rng.choice(len(rows), min(pairs_of, len(rows)), replace=False))
              for name, rows in images.items()}
    return images, subset


def embeddings(model: Path, images: dict[str, Images], batch_size: int) -> dict[str, np.ndarray]:
    from pipeline.evaluation.verification import embed_images, fuse_flips  # torch: after the arguments
    from pipeline.models.loading import load_embedder

    embed = load_embedder(model, device="cpu")
    return {name: fuse_flips(*embed_images(embed, rows, batch_size, True, source=str(model)))
            for name, rows in images.items()}


def figures(student: np.ndarray, teacher: np.ndarray, labels: np.ndarray, subset: np.ndarray) -> dict:
    from pipeline.evaluation.verification import all_pairs_scores

    positive, negative = all_pairs_scores(student, labels)
    tpr = Roc.from_pos_neg(positive, negative).tpr_at([1e-4, 1e-5], "nearest")
    out = {"tpr@1e-4": float(tpr[1e-4]), "tpr@1e-5": float(tpr[1e-5]),
           "cos_to_teacher": float(np.mean(np.sum(student * teacher, axis=1)))}
    s, t = student[subset], teacher[subset]
    upper = np.triu_indices(len(subset), 1)
    negatives = labels[subset][upper[0]] != labels[subset][upper[1]]
    s_pairs, t_pairs = (s @ s.T)[upper][negatives], (t @ t.T)[upper][negatives]
    out["pair_corr"] = float(np.corrcoef(s_pairs, t_pairs)[0, 1])
    out["pair_mae"] = float(np.mean(np.abs(s_pairs - t_pairs)))
    return out


def pair_counts(labels: np.ndarray) -> tuple[int, int]:
    """(positive, negative) pairs among `labels`."""
    n = labels.size
    positive = int(sum(c * (c - 1) // 2 for c in np.unique(labels, return_counts=True)[1]))
    return positive, n * (n - 1) // 2 - positive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=folder_with(*(f"{name}.rec" for name in SETS)),
                        help="folder with train.rec and test.rec")
    parser.add_argument("--teacher", required=True, type=existing_file)
    parser.add_argument("--runs", required=True, type=folder_with(), help="ROOT of ROOT/seedS/METHOD/model.pt")
    parser.add_argument("--methods", required=True, help="comma-separated METHOD folders of every ROOT/seedS")
    parser.add_argument("--seeds", required=True, type=int_list())
    parser.add_argument("--pairs-of", type=integer(3), default=PAIRS_OF,
                        help="images whose negative pairs are correlated (at least 3: two pairs)")
    parser.add_argument("--train-images", type=integer(2), default=None,
                        help="a fixed random subset of this many training images (default: all of train.rec)")
    parser.add_argument("--batch-size", type=positive_int, default=256)
    args = parser.parse_args()
    seeds = args.seeds
    trained = set.intersection(*({model.parent.name for model in (args.runs / f"seed{seed}").glob("*/model.pt")}
                                 for seed in seeds))
    methods = parse_later(parser, "--methods", names(sorted(trained), what=f"the models of every {args.runs}/seedS"),
                          args.methods)
    images, subset = image_sets(args.data, args.train_images, args.pairs_of)
    for name, rows in images.items():  # what the figures need, checked before any model runs
        positive, negative = pair_counts(rows.labels)
        if not positive or not negative:
            where = (f"--train-images {args.train_images}: the {len(rows)} images drawn from train.rec"
                     if name == "train" and args.train_images else f"{args.data / name}.rec: its {len(rows)} images")
            parser.error(f"{where} hold no {'negative' if positive else 'positive'} pair")
        if pair_counts(rows.labels[subset[name]])[1] < 2:
            parser.error(f"--pairs-of {args.pairs_of}: fewer than 2 negative pairs among the {len(subset[name])} "
                         f"images drawn from {name}.rec")
    labels = {name: rows.labels for name, rows in images.items()}
    teacher = embeddings(args.teacher, images, args.batch_size)
    result = {"benchmark": "fidelity", "data": str(args.data), "teacher": {
        name: figures(teacher[name], teacher[name], labels[name], subset[name]) for name in SETS}}
    for method in methods:
        per_seed = {}
        for seed in seeds:
            student = embeddings(args.runs / f"seed{seed}" / method / "model.pt", images, args.batch_size)
            per_seed[seed] = {name: figures(student[name], teacher[name], labels[name], subset[name])
                              for name in SETS}
        summary = {}
        for key in per_seed[seeds[0]]["train"]:
            by_set = {name: {s: per_seed[s][name][key] for s in seeds} for name in SETS}
            summary[key] = {name: dict(zip(("mean", "se"), mean_and_se(list(by_set[name].values()))))
                            for name in SETS}
            difference = paired(by_set["train"], by_set["test"])
            summary[key]["train - test"] = {"mean": difference["mean"], "se": difference["se"]}
        result[method] = summary
    print(json.dumps(result))


if __name__ == "__main__":
    run_main(main)
