"""What ``model_selection=last`` saved by writing ``model.pt`` on validated and final epochs only (session 6).

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/model_save_cost.py [--arch resnet152_3d_merlin] [--repeats 3]

Builds the network of the LIDC CT arm (``resnet152_3d_merlin``: the ResNet-152 encoder of the CT backbone, random
init: the file size and write time do not depend on the values; no download) and times the trainer's own write of
``model.pt`` (:func:`medtune.finetune.handlers.save_atomic`: ``torch.save`` to memory, temp file, fsync, rename)
``--repeats`` times into ``--dir``. Writes ``benchmarks/results/model_save_cost.json``: file size, seconds per
write (each repeat and the median), and the writes and seconds saved per run of the session-5 LIDC CV study recipe
(20 epochs, ``--validations 1``: 20 writes of ``model.pt`` per run before, 1 after; ``checkpoint_last.pt``, the
resume point, is still written every epoch).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet152_3d_merlin")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=20, help="epochs per run of the recipe (LIDC CV: 20)")
    ap.add_argument("--validations", type=int, default=1, help="validations per run of the recipe (LIDC CV: 1)")
    ap.add_argument("--dir", default=None, help="folder to write into (default: a temp folder)")
    ap.add_argument("--out", default=str(HERE / "results" / "model_save_cost.json"))
    args = ap.parse_args()

    import torch

    from medtune.finetune.handlers import save_atomic
    from medtune.weights import create_model

    torch.manual_seed(0)
    net = create_model(args.arch, None, 1, 2, spatial_dims=3, verbose=False)
    state = net.state_dict()
    n_params = sum(p.numel() for p in net.parameters())
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "model.pt"
        wall, cpu = [], []
        for _ in range(args.repeats):
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            save_atomic(state, path)
            t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
            wall.append(round(t1 - t0, 3))
            cpu.append(round((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime), 3))
        size = path.stat().st_size
    before, after = args.epochs, args.validations  # validations are spread so that the last one is the final epoch
    rec = {
        "arch": args.arch,
        "parameters": n_params,
        "model_pt_bytes": size,
        "repeats": args.repeats,
        "write_wall_seconds": wall,
        "write_cpu_seconds": cpu,
        "median_wall_seconds": statistics.median(wall),
        "median_cpu_seconds": statistics.median(cpu),
        "recipe": {"epochs": args.epochs, "validations": args.validations},
        "model_pt_writes_per_run": {"before": before, "after": after},
        "saved_per_run": {
            "writes": before - after,
            "bytes": (before - after) * size,
            "wall_seconds": round((before - after) * statistics.median(wall), 1),
            "cpu_seconds": round((before - after) * statistics.median(cpu), 1),
        },
        "threads": torch.get_num_threads(),
        "load_average_1_5_15": [round(v, 2) for v in os.getloadavg()],
        "note": "2-core machine shared with other engineers' jobs (see load_average): wall times depend on that load "
        "and on the disk; the CPU seconds (torch.save + write + fsync) less so",
    }
    Path(args.out).write_text(json.dumps(rec, indent=2) + "\n")
    print(json.dumps(rec, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
