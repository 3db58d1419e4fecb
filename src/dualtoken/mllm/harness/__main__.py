"""``python -m dualtoken.mllm.harness``: write the tiny CIFAR-10 task, run lmms-eval tasks on a DualToken MLLM.

    python -m dualtoken.mllm.harness task --images runs/mllm_cifar_quick/images/test \\
        --classes ../shared/data/cifar10/classes.txt --out runs/harness_task --limit 40
    python -m dualtoken.mllm.harness run --model runs/mllm_cifar_quick/runs/both/final \\
        --include-path runs/harness_task --tasks dualtoken_cifar_mc,dualtoken_cifar_qa

``run`` is lmms-eval's own evaluation (``simple_evaluate``) with the ``dualtoken`` model; unlike the
``lmms-eval`` command, which prints a traceback and exits 0 when a model fails, it stops on bad input with one
line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ...errors import DataError, DualTokenError
from .cifar_task import write_cifar_task
from .lmms import run_tasks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dualtoken.mllm.harness", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    task = sub.add_parser("task", help="write the tiny CIFAR-10 task folder")
    task.add_argument("--images", required=True, help="a folder of PNGs with labels.json (the CIFAR recipe's)")
    task.add_argument("--classes", required=True, help="classes.txt: the class names, in label order")
    task.add_argument("--out", required=True)
    task.add_argument("--limit", type=int, default=None, help="the first N images (sorted ids)")
    run = sub.add_parser("run", help="lmms-eval tasks on an MLLM folder")
    run.add_argument("--model", required=True, help="a folder written by DualTokenMLLM.save_pretrained")
    run.add_argument("--tasks", required=True, help="comma-separated lmms-eval task names")
    run.add_argument("--include-path", default=None, help="a folder of local tasks (e.g. the written task)")
    run.add_argument("--limit", type=int, default=None)
    run.add_argument("--batch-size", type=int, default=8)
    run.add_argument("--device", default="cpu")
    run.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    try:
        if args.command == "task":
            classes = Path(args.classes)
            if not classes.is_file():
                raise DataError(f"class list not found: {classes}")
            folder = write_cifar_task(args.images, classes.read_text().split(), args.out, args.limit)
            print(f"wrote {folder}: tasks dualtoken_cifar_mc, dualtoken_cifar_qa")
            return 0
        results = run_tasks(
            args.model, args.tasks.split(","), args.include_path, args.limit, args.batch_size, args.device
        )
    except (DualTokenError, ModuleNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(results, indent=2, default=str)
    if args.output:
        Path(args.output).write_text(text + "\n")
    print(text)
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
