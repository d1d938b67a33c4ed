"""`pipeline synthesize` with small segments, so that a test can kill it between two of them.

Run as `python tests/workers/synthesize_segments.py DELAY ARGS...`: synthesize's CLI with 16-image render
tasks, one task per segment, and a sleep of DELAY seconds before each task. Prints "rendered K" on a line of
its own after each training task it renders (what a resumed run renders again is counted). The sleeps only
stretch time; the rendering and writing are the real ones.
"""
from __future__ import annotations

import sys
import time


def main(delay: float, args: list[str]) -> None:
    import pipeline.synthetic.segments as segments
    import pipeline.synthetic.writer as writer
    from pipeline.cli import main as cli

    writer.TASK_IMAGES, segments.SEGMENT_TASKS = 16, 1
    render, rendered = writer.render_task, []

    def counted(task):
        time.sleep(delay)
        images = render(task)
        if task.role == writer.ROLE_TRAIN:
            rendered.append(task)
            print(f"rendered {len(rendered)}", flush=True)
        return images

    writer.render_task = counted
    cli(["synthesize", *args])


if __name__ == "__main__":
    main(float(sys.argv[1]), sys.argv[2:])
