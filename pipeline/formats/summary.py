"""What a face set holds, read without decoding it (the first thing to run on an MS1MV2/MS1MV3/Glint360K copy):
images, identities, images per identity, image size, RecordIO layout, verification `.bin` files and their
pair counts."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.formats.source import open_face_source
from pipeline.formats.verification_bin import load_verification_bin

HISTOGRAM_EDGES = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
BAR_WIDTH = 40


def count_histogram(counts: np.ndarray) -> list[tuple[str, int]]:
    """Identities per images-per-identity range ("0" for empty classes, "1", "2-4", ..., "1000+"), from the
    first to the last non-empty range."""
    rows = [("0", int(np.sum(counts == 0)))] if np.any(counts == 0) else []
    edges = list(HISTOGRAM_EDGES) + [None]
    for low, high in zip(edges[:-1], edges[1:]):
        inside = counts >= low if high is None else (counts >= low) & (counts < high)
        name = f"{low}+" if high is None else (str(low) if high == low + 1 else f"{low}-{high - 1}")
        rows.append((name, int(np.sum(inside))))
    filled = [index for index, (_, count) in enumerate(rows) if count]
    return rows[filled[0] : filled[-1] + 1] if filled else rows


def describe_layout(source) -> str:
    """One phrase for how the set is stored."""
    if not hasattr(source, "rec_path"):
        return "image folder (one sub-folder per identity)"
    if source.has_header:
        a, b = source.header_range
        return f"insightface header: image keys 1..{a - 1}, identity records {a}..{b - 1}"
    return "header-less: every .idx key is an image"


def summarize(data: Path) -> dict:
    """Everything `inspect` prints, as a dict."""
    source = open_face_source(data)
    counts = np.bincount(source.labels, minlength=source.num_classes)
    folder = data if data.is_dir() else data.parent
    summary = {
        "path": str(data),
        "layout": describe_layout(source),
        "images": len(source),
        "classes": int(source.num_classes),
        "identities_with_images": int(np.sum(counts > 0)),
        "per_identity": {
            "min": int(counts.min()),
            "median": float(np.median(counts)),
            "mean": float(counts.mean()),
            "max": int(counts.max()),
        },
        "histogram": count_histogram(counts),
        "image_size": list(source.image_size) if source.image_size else None,
        "first_image_shape": list(source.decode(0).shape),
        "label_source": getattr(source, "label_source", "folder names"),
        "labels_file": str(getattr(source, "labels_file", None) or "") or None,
        "fingerprint": source.fingerprint(),
        "verification": [],
        "other_recordio": sorted(
            path.stem for path in folder.glob("*.rec") if path.with_suffix(".idx").is_file()
            and path != getattr(source, "rec_path", None)
        ),
    }
    for path in sorted(folder.glob("*.bin")):
        _, issame = load_verification_bin(path)
        summary["verification"].append({"file": path.name, "pairs": int(len(issame)), "same": int(issame.sum())})
    return summary


def format_summary(summary: dict) -> str:
    """The summary as the text `inspect` prints."""
    stats = summary["per_identity"]
    size = summary["image_size"]
    lines = [
        f"data:        {summary['path']}",
        f"layout:      {summary['layout']}",
        f"images:      {summary['images']:,}",
        f"identities:  {summary['classes']:,} classes, {summary['identities_with_images']:,} with images",
        f"per identity: min {stats['min']}  median {stats['median']:g}  mean {stats['mean']:.1f}  max {stats['max']}",
        f"image size:  {'x'.join(map(str, size)) if size else 'not declared'} "
        f"(first image decodes to {'x'.join(map(str, summary['first_image_shape']))})",
        f"labels from: {summary['label_source']}"
        + (f" (kept in {summary['labels_file']})" if summary["labels_file"] else ""),
        f"fingerprint: {summary['fingerprint']}",
        "images per identity:",
    ]
    largest = max(count for _, count in summary["histogram"]) or 1
    for name, count in summary["histogram"]:
        lines.append(f"  {name:>8} | {'#' * round(BAR_WIDTH * count / largest):<{BAR_WIDTH}} {count:,}")
    if summary["verification"]:
        lines.append("verification sets:")
        for entry in summary["verification"]:
            lines.append(f"  {entry['file']:<16} {entry['pairs']:>7,} pairs ({entry['same']:,} same)")
    else:
        lines.append("verification sets: none (*.bin)")
    if summary["other_recordio"]:
        lines.append(f"other RecordIO sets: {', '.join(summary['other_recordio'])}")
    return "\n".join(lines)


def sample_sheet(source, identities: int = 8, images: int = 10) -> np.ndarray:
    """A uint8 RGB grid of the first `images` images of the first `identities` identities that have images,
    one identity per row (decoded as training sees them; short identities leave black tiles)."""
    labels = np.asarray(source.labels)
    order = np.argsort(labels, kind="stable")
    chosen = [c for c in np.unique(labels)[:identities]]
    first = source.decode(int(order[0]))
    height, width = first.shape[:2]
    sheet = np.zeros((len(chosen) * height, images * width, 3), dtype=np.uint8)
    for row, identity in enumerate(chosen):
        members = order[labels[order] == identity][:images]
        for column, index in enumerate(members):
            sheet[row * height:(row + 1) * height, column * width:(column + 1) * width] = source.decode(int(index))
    return sheet


def training_faces(data: Path) -> np.ndarray:
    """The data folder's contact sheet (synthesize writes one), else a grid of its first identities."""
    sheet = data / "contact_sheet.png"
    if sheet.is_file():
        return np.asarray(Image.open(sheet).convert("RGB"))
    return sample_sheet(open_face_source(data))
