"""The margin head's rows in checkpoints, by global class index, so that a run resumes on any world size.

A split head (split_head.py) is never gathered: at every checkpoint each rank writes its own rows and their
SGD momentum to `checkpoint.pt.head/<step>-rows<first>-<stop>.pt`, all ranks meet at a barrier, and only then
does rank 0 write checkpoint.pt, which names those files (`head_rows`) instead of holding `head.weight` and
its momentum; files of other checkpoints are removed after it. A reader never sees a checkpoint.pt whose
rows are not all on disk, and a run killed in between resumes from the previous checkpoint.pt, whose files
are still there.

On resume (`localise_head`), whatever wrote the checkpoint (a split head on any number of ranks, or the
replicated head), the checkpoint's rows are re-cut to this run's head: every rank copies the rows it owns
now, weight and momentum, from the files that hold them (memory-mapped, so no rank reads the whole head).
The rest of the resume (shape checks, loading) then sees an ordinary checkpoint of this run's shapes.
`write_whole_head` writes every row as one file (`--save-head`).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from pipeline.errors import PipelineError
from pipeline.models.model_file import load_failure
from pipeline.storage.io import write_with
from pipeline.training import ddp
from pipeline.training.split_head import row_range

ROWS_FORMAT = "ekd-pipeline-head-rows"
HEAD_FORMAT = "ekd-pipeline-margin-head"
WEIGHT_KEY = "head.weight"  # the head's rows in the trainee's state dict
_SHARD = re.compile(r"^\d+-\d+-rows\d+-\d+\.pt$")


def rows_folder(state_path: Path) -> Path:
    return state_path.with_name(state_path.name + ".head")


def _param_index(optimizer, param: torch.Tensor) -> int | None:
    """`param`'s number in the optimiser's state dict (None: not optimised, e.g. a class-centre buffer)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return next((i for i, p in enumerate(params) if p is param), None)


def _momentum(optimizer, param: torch.Tensor) -> torch.Tensor | None:
    return optimizer.state.get(param, {}).get("momentum_buffer")


def save_head_rows(state_path: Path, head, optimizer, step: str) -> dict:
    """Every rank writes its rows and momentum (a collective, ended by a barrier); returns the manifest that
    rank 0 stores in checkpoint.pt. `step` names this checkpoint's files."""
    folder, world = rows_folder(state_path), ddp.world_size()
    first, stop = head.first_row, head.first_row + head.weight.shape[0]
    if ddp.rank() == 0:
        folder.mkdir(exist_ok=True)
    ddp.barrier()
    momentum = _momentum(optimizer, head.weight)
    rows = {"format": ROWS_FORMAT, "first_row": first, "num_classes": head.num_classes,
            "weight": head.weight.detach().cpu(), "momentum": None if momentum is None else momentum.cpu()}
    write_with(folder / f"{step}-rows{first}-{stop}.pt", lambda handle: torch.save(rows, handle))
    ddp.barrier()  # every rank's rows on disk before rank 0's checkpoint.pt names them
    ranges = [row_range(head.num_classes, world, r) for r in range(world)]
    return {"num_classes": head.num_classes, "dim": head.dim,
            "files": [[f"{step}-rows{a}-{b}.pt", a, b] for a, b in ranges]}


def strip_head(state: dict, head, optimizer, manifest: dict) -> None:
    """checkpoint.pt's entries without rank 0's rows (they are in the files of `manifest`)."""
    state["trainee"].pop(WEIGHT_KEY, None)
    index = _param_index(optimizer, head.weight)
    if index is not None:
        state["optimizer"] = {**state["optimizer"],
                              "state": {k: v for k, v in state["optimizer"]["state"].items() if k != index}}
    state["head_rows"] = manifest


def remove_other_rows(state_path: Path, manifest: dict | None) -> None:
    """After checkpoint.pt is in place: the row files it does not name."""
    folder = rows_folder(state_path)
    keep = {name for name, _, _ in (manifest or {}).get("files", [])}
    if folder.is_dir():
        for candidate in folder.iterdir():
            if _SHARD.match(candidate.name) and candidate.name not in keep:
                candidate.unlink(missing_ok=True)


def _refuse(state_path: Path, what: str):
    raise PipelineError(f"{state_path}: cannot resume: {what}; delete it or use --no-resume")


def read_rows(state_path: Path, state: dict, first: int, stop: int,
              index: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows [first, stop) of the checkpoint's head and their momentum (None before the first step or for a
    centre buffer), from its row files or from the whole head it holds (its momentum: optimiser entry
    `index`, the head parameter's number, the same in every trainee of this layout)."""
    manifest = state.get("head_rows")
    if manifest is None:
        whole = state["trainee"].get(WEIGHT_KEY)
        if not isinstance(whole, torch.Tensor) or whole.dim() != 2 or whole.shape[0] < stop:
            _refuse(state_path, f"it holds no margin head of {stop} classes or more")
        momentum = (state["optimizer"].get("state", {}).get(index) or {}).get("momentum_buffer")
        return whole[first:stop], None if momentum is None else momentum[first:stop]
    weight = momentum = None
    for name, low, high in manifest["files"]:
        low, high = max(low, first), min(high, stop)
        if low >= high:
            continue
        rows = _load_rows(state_path, rows_folder(state_path) / name)
        if weight is None:
            weight = torch.empty(stop - first, rows["weight"].shape[1], dtype=rows["weight"].dtype)
            momentum = None if rows["momentum"] is None else torch.empty_like(weight)
        part = slice(low - rows["first_row"], high - rows["first_row"])
        weight[low - first:high - first] = rows["weight"][part]
        if momentum is not None:
            momentum[low - first:high - first] = rows["momentum"][part]
    if weight is None:
        _refuse(state_path, f"no head rows file holds classes {first}..{stop}")
    return weight, momentum


def _load_rows(state_path: Path, path: Path) -> dict:
    try:
        rows = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # a missing, torn or foreign file: say which
        _refuse(state_path, f"head rows {path.name}: {load_failure(error)}")
    if not isinstance(rows, dict) or rows.get("format") != ROWS_FORMAT:
        _refuse(state_path, f"{path.name} is not a head rows file of this pipeline")
    return rows


def localise_head(state_path: Path, state: dict, head, optimizer) -> None:
    """Re-cut the checkpoint's head to this run's (see the module docstring), in `state`, in place."""
    manifest, first = state.get("head_rows"), getattr(head, "first_row", 0)
    saved_classes = manifest["num_classes"] if manifest else None
    if manifest is None and first == 0 and getattr(head, "num_classes", 0) == head.weight.shape[0]:
        return  # replicated head to replicated head: the checkpoint is already this run's
    if saved_classes is not None and saved_classes != head.num_classes:
        _refuse(state_path, f"its margin head has {saved_classes} classes, this run's {head.num_classes}")
    index = _param_index(optimizer, head.weight)
    weight, momentum = read_rows(state_path, state, first, first + head.weight.shape[0], index)
    state["trainee"][WEIGHT_KEY] = weight.clone()
    if index is not None:
        entries = dict(state["optimizer"].get("state") or {})
        entries.pop(index, None)
        if momentum is not None:
            entries[index] = {"momentum_buffer": momentum.clone()}
        state["optimizer"] = {**state["optimizer"], "state": entries}


def write_whole_head(state_path: Path, out: Path, head, optimizer) -> Path:
    """Every row of checkpoint.pt's head (this run's `head`) and its momentum as one file, `out` (atomically)."""
    state = torch.load(state_path, map_location="cpu", weights_only=True, mmap=True)
    classes = head.num_classes
    weight, momentum = read_rows(state_path, state, 0, classes, _param_index(optimizer, head.weight))
    whole = {"format": HEAD_FORMAT, "num_classes": classes, "weight": weight.clone(),
             "momentum": None if momentum is None else momentum.clone()}
    return write_with(out, lambda handle: torch.save(whole, handle))
