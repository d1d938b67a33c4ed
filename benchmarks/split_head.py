"""Benchmark: the margin head split across ranks (pipeline/training/split_head.py) against the replicated head,
on W gloo ranks on CPU (torch.multiprocessing spawn, 127.0.0.1), batch B per rank, fp32, SGD with momentum.

In one run, `SplitMarginHead` first, then `MarginHead` with DDP's all-reduce of its gradient (issued as
`dist.all_reduce` + the average, as DDP does), forward + backward + SGD step each:
- head memory per rank: the bytes of the weights, gradient and momentum tensors the head and optimiser hold,
  checked to be 1/W of the replicated head's to within one row and rows x dim x 4 B (`split_memory`);
- head communication per step: every torch.distributed collective called in the step, counted by wrapping
  the `torch.distributed` functions (op, bytes of its result on the rank, seconds), checked against the
  formulas (`split_collectives`, `replicated_collectives`; `communication` adds the ring algorithms' bytes);
- step time: wall and CPU seconds (process time), the slowest rank of a step, minimum over the timed steps;
- `memory_only`: the sizes at `--memory-classes` / `--memory-ranks` from the split sizes, nothing allocated.

Memory: a replicated rank holds the whole head, gradient, momentum and the step's transients (~5.8 GiB peak
at 360,232 x 512, batch 128): four would be ~23 GiB. So only the first `--replicated-full-ranks` ranks (default
1) run the replicated step; the others join the same all-reduce with a gradient-sized buffer each (what DDP
sends from them): the all-reduce measured is the real one across W ranks. With fewer cores than ranks the
waiting ranks leave the full ones CPU: the wall ratio flatters the replicated head, the CPU-seconds ratio is
the fair one (`replicated_setup` in the JSON).

    OMP_NUM_THREADS=1 python benchmarks/split_head.py            # 360,232 x 512, 4 ranks, batch 128 per rank
    python benchmarks/split_head.py --table                      # README's table: 8 GPUs, three datasets

Prints one JSON line; exits 1 with one line on stderr when a check fails. Measured in this project:
results/split_head.json, docs/scale.md ("The split margin head").
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))  # arguments.py, also when imported from elsewhere
from arguments import non_negative_int, positive_int, processes, threads  # noqa: E402

from pipeline.losses.margin import MarginHead  # noqa: E402
from pipeline.training.split_head import SplitMarginHead, row_range  # noqa: E402

FLOAT, LABEL = 4, 8  # bytes of an fp32 value (rows, embeddings, sums) and of an int64 label
SGD = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
DATASETS = {"MS1MV2": 85_742, "Glint360K": 360_232, "WebFace42M": 2_059_906}
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce", "reduce_scatter",
               "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather", "scatter")  # all counted
BUFFERS = ("weights", "gradient", "momentum")


# ------------------------------------------------------------------------------------------------ formulas
def head_memory(rows: int, dim: int) -> dict:
    """Bytes of a head of `rows` fp32 rows: weights, gradient and SGD momentum (one buffer each)."""
    each = rows * dim * FLOAT
    return {"rows": rows, **{f"{b}_bytes": each for b in BUFFERS}, "total_bytes": 3 * each}


def split_memory(classes: int, dim: int, world: int) -> dict:
    """The split head's memory on its largest rank (rank 0: `row_range` gives the first ranks one row more)."""
    first, stop = row_range(classes, world, 0)
    return head_memory(stop - first, dim)


def split_collectives(dim: int, world: int, batch: int) -> list[tuple[str, str, int]]:
    """(op, what, bytes of its result on each rank) of one split-head step, in the order they are called."""
    n = world * batch
    return [("all_gather", "embeddings", n * dim * FLOAT), ("all_gather", "labels", n * LABEL),
            ("all_reduce", "row maxima", n * FLOAT),
            ("all_reduce", "sums of exponentials and target logits", 2 * n * FLOAT),
            ("all_reduce", "gradient at the gathered embeddings (backward)", n * dim * FLOAT)]


def replicated_collectives(classes: int, dim: int) -> list[tuple[str, str, int]]:
    """DDP's all-reduce of the whole head gradient."""
    return [("all_reduce", "head gradient", classes * dim * FLOAT)]


def communication(collectives: list[tuple[str, str, int]], world: int) -> dict:
    """Total bytes, and what one rank sends with ring algorithms: (W-1)/W of an all-gather's result, twice
    that of an all-reduce's (reduce-scatter + all-gather)."""
    wire = sum((2 if op == "all_reduce" else 1) * (world - 1) / world * size for op, _, size in collectives)
    return {"bytes": sum(size for _, _, size in collectives), "ring_wire_bytes_per_rank": round(wire)}


def human(size: float) -> str:
    """Decimal units, as the README writes sizes."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}" if size < 100 * scale else f"{size / scale:.0f} {unit}"
    return f"{size:.0f} B"


def table(dim: int, world: int, batch: int) -> str:
    """Per-GPU head memory and per-step head communication, split vs replicated, for the DATASETS."""
    lines = [f"| dataset ({world} GPUs, {dim}-d, batch {batch} per GPU) | classes | head memory per GPU, split "
             "(weights + gradient + momentum) | replicated | head communication per step, split | replicated "
             "(all-reduce) | ratio |", "|---|---|---|---|---|---|---|"]
    for name, classes in DATASETS.items():
        split = communication(split_collectives(dim, world, batch), world)["bytes"]
        whole = communication(replicated_collectives(classes, dim), world)["bytes"]
        lines.append(f"| {name} | {classes:,} | {human(split_memory(classes, dim, world)['total_bytes'])} | "
                     f"{human(head_memory(classes, dim)['total_bytes'])} | {human(split)} | {human(whole)} | "
                     f"{whole / split:.0f}x |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ one rank
def nbytes(tensor: torch.Tensor) -> int:
    """What `tensor` allocates (its storage: a view counts what it keeps alive)."""
    return tensor.untyped_storage().nbytes()


def payload(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


@contextmanager
def counted(log: list):
    """Every torch.distributed collective called inside: op, bytes of its first argument (the result on this
    rank, or the list of them), seconds; appended to `log`."""
    saved = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def wrap(name, call):
        def call_counted(*args, **kwargs):
            started = time.perf_counter()
            out = call(*args, **kwargs)
            first = args[0] if args else next(iter(kwargs.values()))
            size = sum(map(payload, first)) if isinstance(first, (list, tuple)) else payload(first)
            log.append({"op": name, "bytes": size, "seconds": time.perf_counter() - started})
            return out
        return call_counted

    for name, call in saved.items():
        setattr(dist, name, wrap(name, call))
    try:
        yield log
    finally:
        for name, call in saved.items():
            setattr(dist, name, call)


def local_batch(opts: dict, step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's embeddings (the backbone's output, a leaf with gradient) and labels of step `step`."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    embeddings = torch.randn(opts["batch"], opts["dim"], generator=g).requires_grad_()
    return embeddings, torch.randint(0, opts["classes"], (opts["batch"],), generator=g)


def timed_steps(opts: dict, rank: int, step_fn) -> dict:
    """`step_fn(embeddings, labels)` for warmup + steps steps: wall and CPU seconds and the collectives of the
    timed ones."""
    out: dict = {"wall_s": [], "cpu_s": [], "collectives": []}
    for step in range(opts["warmup"] + opts["steps"]):
        embeddings, labels = local_batch(opts, step, rank)
        dist.barrier()
        log: list = []
        wall, cpu = time.perf_counter(), time.process_time()
        with counted(log):
            step_fn(embeddings, labels)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if step >= opts["warmup"]:
            out["wall_s"].append(wall)
            out["cpu_s"].append(cpu)
            out["collectives"].append(log)
    return out


def held(head, optimizer) -> dict:
    """Rows and bytes of the head's weights, gradient and momentum as allocated."""
    weight = head.weight
    tensors = (weight, weight.grad, optimizer.state[weight]["momentum_buffer"])
    return {"rows": weight.shape[0], **{f"{b}_bytes": nbytes(t) for b, t in zip(BUFFERS, tensors)}}


def split_phase(opts: dict, rank: int) -> dict:
    torch.manual_seed(0)
    head = SplitMarginHead(opts["classes"], opts["dim"])
    optimizer = torch.optim.SGD(head.parameters(), **SGD)

    def step(embeddings, labels):
        optimizer.zero_grad()
        head(embeddings, labels).backward()
        optimizer.step()

    out = timed_steps(opts, rank, step)
    out.update(first_row=head.first_row, memory=held(head, optimizer))
    return out


def replicated_phase(opts: dict, rank: int, world: int) -> dict:
    full = rank < opts["replicated_full_ranks"]
    if full:
        torch.manual_seed(0)
        head = MarginHead(opts["classes"], opts["dim"])
        optimizer = torch.optim.SGD(head.parameters(), **SGD)
    else:
        buffer = torch.zeros(opts["classes"], opts["dim"])  # what DDP all-reduces from this rank

    def step(embeddings, labels):
        if not full:
            dist.all_reduce(buffer)
            return
        optimizer.zero_grad()
        head(embeddings, labels).backward()
        dist.all_reduce(head.weight.grad)  # DDP: the gradient summed over the ranks, then averaged
        head.weight.grad.div_(world)
        optimizer.step()

    out = timed_steps(opts, rank, step)
    out.update(full=full, memory=held(head, optimizer) if full else {"all_reduce_buffer_bytes": nbytes(buffer)})
    return out


def rank_main(rank: int, world: int, port: int, opts: dict, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(opts["threads"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = {"split": split_phase(opts, rank)}
        result["rss_after_split_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        result["replicated"] = replicated_phase(opts, rank, world)
        result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        dist.barrier()
    finally:
        dist.destroy_process_group()
    Path(folder, f"rank{rank}.json").write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------------ the report
def per_step(runs: list[dict], key: str) -> float:
    """The minimum over the timed steps of the slowest rank's seconds."""
    return round(min(max(steps) for steps in zip(*(run[key] for run in runs))), 4)


def measured_collectives(runs: list[dict]) -> list[tuple[str, int]]:
    """The (op, bytes) sequence of a step, asserted to be that of every timed step on every rank."""
    sequences = {tuple((c["op"], c["bytes"]) for c in log) for run in runs for log in run["collectives"]}
    if len(sequences) != 1:
        raise CheckFailed(f"the steps called different collectives: {sorted(sequences)}")
    return list(sequences.pop())


class CheckFailed(RuntimeError):
    """A measured figure disagrees with the formula or the 1/W target."""


def compare(measured: list[tuple[str, int]], formula: list[tuple[str, str, int]], what: str) -> None:
    if measured != [(op, size) for op, _, size in formula]:
        raise CheckFailed(f"{what}: collectives called {measured}, the formula says {formula}")


def memory_report(opts: dict, split: list[dict], replicated: list[dict]) -> dict:
    classes, dim, world, row = opts["classes"], opts["dim"], len(split), opts["dim"] * FLOAT

    def buffers(memory: dict) -> dict:
        return {k: memory[k] for k in ("rows", *(f"{b}_bytes" for b in BUFFERS))}

    whole = [r["memory"] for r in replicated if r["full"]]
    if any(memory != buffers(head_memory(classes, dim)) for memory in whole):
        raise CheckFailed(f"replicated head holds {whole}, not {classes} x {dim} x {FLOAT} B per buffer")
    for rank, run in enumerate(split):
        first, stop = row_range(classes, world, rank)
        if run["first_row"] != first or run["memory"] != buffers(head_memory(stop - first, dim)):
            raise CheckFailed(f"rank {rank}: split head holds {run['memory']} from row {run['first_row']}, "
                              f"not rows {first}..{stop} x {dim} x {FLOAT} B per buffer")
    deviation = max(abs(run["memory"][f"{b}_bytes"] - whole[0][f"{b}_bytes"] / world) for run in split
                    for b in BUFFERS)
    if deviation > row:
        raise CheckFailed(f"a rank's split head is {deviation / row:.2f} rows off 1/{world} of the replicated one")
    totals = [sum(run["memory"][f"{b}_bytes"] for b in BUFFERS) for run in split]
    whole_total = sum(whole[0][f"{b}_bytes"] for b in BUFFERS)
    return {"split": {key: [run["memory"][key] for run in split] for key in buffers(whole[0])}
            | {"total_bytes": totals},
            "replicated": {**whole[0], "total_bytes": whole_total, "measured_on_ranks": len(whole)},
            "replicated_over_split": round(whole_total / max(totals), 3),
            "check": {"split_is_1_over_W_within_one_row": True, "max_deviation_rows": round(deviation / row, 4),
                      "equals_rows_x_dim_x_4_per_rank": True}}


def communication_report(opts: dict, split: list[dict], replicated: list[dict]) -> dict:
    world, sides = len(split), {}
    for name, runs, formula in (("split", split, split_collectives(opts["dim"], world, opts["batch"])),
                                ("replicated", replicated, replicated_collectives(opts["classes"], opts["dim"]))):
        got = measured_collectives(runs)
        compare(got, formula, f"{name} head")
        expected = communication(formula, world)
        sides[name] = {"measured": [{"op": op, "what": what, "bytes": size}
                                    for (op, size), (_, what, _) in zip(got, formula)],
                       "measured_bytes": sum(size for _, size in got), "formula_bytes": expected["bytes"],
                       "ring_wire_bytes_per_rank": expected["ring_wire_bytes_per_rank"], "agree": True}
    sides["replicated"]["all_reduce_wall_s_min"] = round(min(
        log[-1]["seconds"] for run in replicated if run["full"] for log in run["collectives"]), 4)
    for key, suffix in (("formula_bytes", ""), ("ring_wire_bytes_per_rank", "_ring_wire")):
        sides[f"replicated_over_split{suffix}"] = round(sides["replicated"][key] / sides["split"][key], 2)
    return sides


def report(opts: dict, runs: list[dict], seconds: float) -> dict:
    world = len(runs)
    split = [run["split"] for run in runs]
    replicated = [run["replicated"] for run in runs]
    full = [run for run in replicated if run["full"]]
    times = {name: {f"{k}_s_min": per_step(runs, f"{k}_s") for k in ("wall", "cpu")}
             for name, runs in (("split", split), ("replicated", full))}
    for k in ("wall", "cpu"):
        times[f"replicated_over_split_{k}"] = round(times["replicated"][f"{k}_s_min"] / times["split"][f"{k}_s_min"], 3)
    classes, ranks = opts["memory_classes"], opts["memory_ranks"]
    memory_only = {"classes": classes, "ranks": ranks, "dim": opts["dim"],
                   "split_per_rank": split_memory(classes, opts["dim"], ranks),
                   "replicated_per_rank": head_memory(classes, opts["dim"])}
    communicated = communication_report(opts, split, replicated)
    return {
        "benchmark": "split-head", "classes": opts["classes"], "dim": opts["dim"], "ranks": world,
        "batch_per_rank": opts["batch"], "global_batch": world * opts["batch"], "backend": "gloo", "device": "cpu",
        "threads_per_rank": opts["threads"], "warmup_steps": opts["warmup"], "timed_steps": opts["steps"],
        "sgd": SGD, "torch": torch.__version__, "cpu_cores": os.cpu_count(),
        "head_memory_per_rank": memory_report(opts, split, replicated),
        "head_communication_per_step": communicated,
        "target_communication_ratio_met": communicated["replicated_over_split"] >= 100,
        "step_time": times,
        "replicated_setup": {
            "full_ranks": len(full), "all_reduce_only_ranks": world - len(full),
            "note": f"{len(full)} rank(s) run the whole replicated step, the others only join its all-reduce with a "
                    "gradient-sized buffer (memory); the wall ratio favours the replicated head (the waiting ranks "
                    "leave the full ones CPU), the CPU-seconds ratio compares the work per rank"},
        "memory_only": memory_only,
        "peak_rss_bytes_per_rank": [run["peak_rss_bytes"] for run in runs],
        "peak_rss_after_split_bytes_per_rank": [run["rss_after_split_bytes"] for run in runs],
        "seconds": round(seconds, 1), "ok": True,
    }


# ------------------------------------------------------------------------------------------------ main
def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="split_head.py", description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=positive_int, default=DATASETS["Glint360K"])
    parser.add_argument("--dim", type=positive_int, default=512, help="embedding size")
    parser.add_argument("--ranks", type=processes(1), default=4, help="gloo processes")
    parser.add_argument("--batch", type=positive_int, default=128, help="samples per rank and step")
    parser.add_argument("--steps", type=positive_int, default=3, help="timed steps of each head")
    parser.add_argument("--warmup", type=non_negative_int, default=1, help="untimed steps before them")
    parser.add_argument("--threads", type=threads(1), default=1, help="torch threads per rank")
    parser.add_argument("--replicated-full-ranks", type=positive_int, default=1,
                        help="ranks that run the whole replicated step (the others only its all-reduce)")
    parser.add_argument("--memory-classes", type=positive_int, default=DATASETS["WebFace42M"],
                        help="classes of the memory-only figure")
    parser.add_argument("--memory-ranks", type=positive_int, default=8, help="ranks of memory-only and --table")
    parser.add_argument("--table", action="store_true",
                        help="print the per-GPU table (DATASETS at --memory-ranks, --dim, --batch) and exit")
    args = parser.parse_args(argv)
    if args.classes < args.ranks:
        parser.error(f"--classes {args.classes}: fewer classes than --ranks {args.ranks} cannot be split")
    if args.memory_classes < args.memory_ranks:
        parser.error(f"--memory-classes {args.memory_classes}: fewer classes than --memory-ranks {args.memory_ranks}")
    if args.replicated_full_ranks > args.ranks:
        parser.error(f"--replicated-full-ranks {args.replicated_full_ranks}: more than --ranks {args.ranks}")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.table:
        print(table(args.dim, args.memory_ranks, args.batch))
        return 0
    opts = {k: v for k, v in vars(args).items() if k != "table"}
    started = time.perf_counter()
    with socket.socket() as probe:  # a free port on localhost for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="ekd-split-head-") as folder:
        try:
            mp.start_processes(rank_main, args=(args.ranks, port, opts, folder), nprocs=args.ranks,
                               start_method="spawn")
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as error:
            lines = [line for line in str(error).strip().splitlines() if line.strip()]
            print(f"split_head: FAILED: a rank raised: {lines[-1] if lines else error}", file=sys.stderr)
            return 1
        runs = [json.loads(Path(folder, f"rank{r}.json").read_text()) for r in range(args.ranks)]
    try:
        result = report(opts, runs, time.perf_counter() - started)
    except CheckFailed as error:
        print(f"split_head: FAILED: {error}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
