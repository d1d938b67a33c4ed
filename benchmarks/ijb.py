"""What an IJB-C run costs: the measured rates of `pipeline evaluate-ijb`'s parts on this machine, and the
full-IJB-C estimate they give.

Prints one JSON line:
- `align_per_s`: loose crops decoded and aligned per second by one process (the synthetic IJB set at 112 px:
  160-200 px crops, as a DataLoader worker does it);
- `forward_per_s`: images per second through the model, both views (crop and mirror), `--arch` at 112 px
  on `--device` (fp16 autocast on CUDA, as evaluate-ijb);
- `pool_s`, `scores_s`, `roc_s`: media/template pooling of 469,375 image features, the scores of 15,658,489
  template pairs and the ROC read-out, at IJB-C size on random features;
- `ijbc_estimate_s`: 469,375 / min(forward rate, align rate x `--workers`) + pooling + scores + ROC, the
  wall time of a full IJB-C run with this model, device and worker count (an estimate from these rates).

    python benchmarks/ijb.py [--arch r100] [--device cpu] [--images 32] [--workers 8]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from arguments import architecture, positive_int, run_main, torch_device

# torch and the pipeline's torch modules are imported where they are used: after the arguments are checked
if TYPE_CHECKING:
    import torch

IJBC = {"images": 469_375, "templates": 23_124, "pairs": 15_658_489, "genuine": 19_557}


def align_rate(folder: Path) -> tuple[float, list[np.ndarray]]:
    from pipeline.evaluation.alignment import reference_points, similarity_transforms
    from pipeline.evaluation.ijb_features import AlignedCrops
    from pipeline.formats.ijb import IjbPaths, read_ijb

    paths = IjbPaths(folder / "IJBC", "IJBC")
    meta = read_ijb(paths.folder, "IJBC")
    matrices, _ = similarity_transforms(meta.landmarks, reference_points(112))
    crops = AlignedCrops(paths, meta, matrices, 112)
    started = time.perf_counter()
    aligned = [crops[i][1] for i in range(len(crops))]
    return len(crops) / (time.perf_counter() - started), aligned


def forward_rate(arch: str, device: torch.device, aligned: list[np.ndarray], batch: int) -> float:
    from pipeline.models import get_model
    from pipeline.models.loading import Embedder
    from pipeline.models.preprocess import forward_views, prepare_teacher

    model = get_model(arch, input_size=112).to(device).eval()
    embedder = prepare_teacher(Embedder(model, kind="bench", name=arch, dim=model.num_features, input_size=112,
                                        device=device, fingerprint="", path=Path(arch), module=model))
    images = np.stack((aligned * (batch // len(aligned) + 1))[:batch])
    forward_views(embedder, images[:2]).cpu()  # warm-up (cuDNN autotuning, allocator)
    started = time.perf_counter()
    forward_views(embedder, images).cpu()
    return batch / (time.perf_counter() - started)


def scoring_seconds(dim: int = 512) -> dict[str, float]:
    from pipeline.evaluation.ijb import pair_scores, template_features
    from pipeline.evaluation.metrics import Roc
    from pipeline.formats.ijb import IjbMeta

    rng = np.random.default_rng(0)
    n, t, p = IJBC["images"], IJBC["templates"], IJBC["pairs"]
    templates = rng.integers(0, t, n)
    meta = IjbMeta([], templates, templates * 10 + rng.integers(0, 8, n), None, rng.random(n).astype(np.float32),
                   None, None)
    block = rng.normal(size=(1 << 15, 2, dim)).astype(np.float32)
    started = time.perf_counter()
    unique, features = template_features(((s, block[:min(1 << 15, n - s)]) for s in range(0, n, 1 << 15)), meta)
    pooled = time.perf_counter()
    scores = pair_scores(unique, features, unique[rng.integers(0, unique.size, (p, 2))])
    scored = time.perf_counter()
    Roc.from_scores(scores, rng.random(p) < IJBC["genuine"] / p).tpr_at([1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1])
    return {"pool_s": pooled - started, "scores_s": scored - pooled, "roc_s": time.perf_counter() - scored}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=architecture(), default="r100")
    parser.add_argument("--device", type=torch_device, default="cpu")
    parser.add_argument("--images", type=positive_int, default=32, help="images per timed forward batch")
    parser.add_argument("--workers", type=positive_int, default=8,
                        help="DataLoader workers assumed for the estimate (none is started)")
    args = parser.parse_args()

    import torch

    from pipeline.synthetic.ijb import write_ijb_set

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        write_ijb_set(tmp, seed=0, size=112, difficulty=0.5, identities=4, templates=4)
        align, aligned = align_rate(Path(tmp))
    forward = forward_rate(args.arch, args.device, aligned, args.images)
    scoring = scoring_seconds()
    images_per_s = min(forward, align * args.workers)
    estimate = IJBC["images"] / images_per_s + sum(scoring.values())
    print(json.dumps({"arch": args.arch, "device": str(args.device), "align_per_s": round(align, 1),
                      "forward_per_s": round(forward, 2), **{k: round(v, 1) for k, v in scoring.items()},
                      "workers": args.workers, "ijbc_estimate_s": round(estimate), "ijbc": IJBC}))


if __name__ == "__main__":
    run_main(main)
