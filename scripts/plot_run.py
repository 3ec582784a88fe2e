"""Render a run's dashboard panels to a PNG, from its offline W&B run (read back from the `.wandb` record log,
no network, no `wandb sync`) or from a CSV logger's metrics.csv.

    python scripts/plot_run.py runs/tiny/<date>/wandb/offline-run-*  --out docs/images/dashboard.png
    python scripts/plot_run.py runs/tiny/<date>/csv/version_0/metrics.csv --out dashboard.png

Panels: loss, loss per timestep bin, gradient norm, learning rate, images/s with data-wait fraction, model
TFLOP/s (with MFU where logged), samples seen, skipped samples. docs/dashboards.md explains each.
"""

from __future__ import annotations

import argparse
import csv
import json
import struct
import sys
from pathlib import Path

BLOCK = 32768  # the .wandb file is a LevelDB-style log: 32 KiB blocks of (crc32, length, type) framed records
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path):
    """The protobuf `Record`s of a `.wandb` file (wandb.proto.wandb_internal_pb2), in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B record log")
    pos, chunks = 7, []  # ':W&B', 2 magic bytes, 1 version byte
    while pos + 7 <= len(data):
        room = BLOCK - pos % BLOCK
        if room < 7:  # a block's tail too short for a header is padding
            pos += room
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        if pos + 7 + length > len(
            data
        ):  # a record still being written (or cut off by a kill): the log ends here
            break
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        chunks = [payload] if kind in (FULL, FIRST) else chunks + [payload]
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(b"".join(chunks))
            yield record


def read_wandb_history(run: Path) -> list[dict]:
    """Logged scalar rows ({key: value, '_step': n}) of an offline run dir or its .wandb file."""
    path = run if run.suffix == ".wandb" else next(run.glob("*.wandb"), None)
    if path is None:
        raise FileNotFoundError(
            f"no .wandb file in {run}: pass an offline run dir, a .wandb file or a metrics.csv"
        )
    rows = []
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                try:
                    value = json.loads(item.value_json)
                except json.JSONDecodeError:
                    continue
                if isinstance(value, int | float):
                    row[key] = float(value)
            rows.append(row)
    return rows


def read_csv_history(path: Path) -> list[dict]:
    with path.open() as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def series(rows: list[dict], key: str, step_key: str) -> tuple[list[float], list[float]]:
    pts = [(r[step_key], r[key]) for r in rows if key in r and step_key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot(rows: list[dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    step_key = "trainer/global_step" if any("trainer/global_step" in r for r in rows) else "step"
    keys = set().union(*rows) if rows else set()
    fig, axes = plt.subplots(2, 4, figsize=(18, 7.5))
    axes = axes.ravel()

    def line(ax, key, label=None, **kw):
        x, y = series(rows, key, step_key)
        if x:
            ax.plot(x, y, label=label or key, **kw)
        return bool(x)

    line(axes[0], "train/loss")
    axes[0].set_title("train/loss")
    bins = sorted(k for k in keys if k.startswith("train_loss_by_t/"))
    cmap = plt.get_cmap("viridis")
    for i, key in enumerate(bins):
        line(axes[1], key, key.split("/", 1)[1], color=cmap(i / max(1, len(bins) - 1)), lw=1)
    axes[1].set_title("train_loss_by_t/* (t bin)")
    if bins:
        axes[1].legend(fontsize=6, ncol=2)
    line(axes[2], "train/grad_norm")
    axes[2].set_title("train/grad_norm (before clipping)")
    lr_keys = sorted(k for k in keys if k.startswith("lr-"))
    for key in lr_keys:
        line(axes[3], key)
    axes[3].set_title(", ".join(lr_keys) or "lr")
    line(axes[4], "perf/images_per_sec", color="tab:blue")
    axes[4].set_title("perf/images_per_sec (blue), data_wait_frac (red)")
    twin = axes[4].twinx()
    line(twin, "perf/data_wait_frac", color="tab:red", lw=1)
    twin.set_ylim(0, 1)
    line(axes[5], "perf/tflops_per_device")
    title5 = "perf/tflops_per_device"
    if "perf/mfu" in keys:
        twin5 = axes[5].twinx()
        line(twin5, "perf/mfu", color="tab:orange", lw=1)
        title5 += ", perf/mfu (orange)"
    axes[5].set_title(title5)
    line(axes[6], "perf/samples_seen")
    axes[6].set_title("perf/samples_seen")
    skipped = sorted(k for k in keys if k.startswith("data/skipped"))
    for key in skipped:
        line(axes[7], key, key.split("/", 1)[1])
    axes[7].set_title("data/skipped_* (none in this run)" if not skipped else "data/skipped_*")
    if skipped:
        axes[7].legend(fontsize=7)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", help="offline W&B run dir, .wandb file, or metrics.csv")
    parser.add_argument("--out", default="dashboard.png")
    parser.add_argument("--title", default=None)
    args = parser.parse_args()
    run = Path(args.run)
    if not run.exists():
        sys.exit(f"no such run: {run}")
    try:
        rows = read_csv_history(run) if run.suffix == ".csv" else read_wandb_history(run)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(str(err))
    if not rows:
        sys.exit(f"no logged scalars in {run}")
    plot(rows, Path(args.out), args.title or str(run))


if __name__ == "__main__":
    main()
