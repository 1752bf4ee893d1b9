"""Plots of training runs: losses, class error and AP per epoch (log.txt), and precision-recall
curves (eval.pth or eval/latest.pth): python -m util.plot_utils OUTPUT_DIR ... --out plots.png"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

# panels of plot_logs: (title, log key without the train_/test_ prefix)
LOG_PANELS = (("loss (weighted sum)", "loss"), ("classification loss", "loss_ce"),
              ("L1 box loss", "loss_bbox"), ("GIoU loss", "loss_giou"),
              ("class error (%)", "class_error"))
# entries of COCOeval.stats (log keys test_coco_eval_bbox, test_coco_eval_masks) drawn in the AP panels
AP_ENTRIES = (("AP", 0, "-"), ("AP50", 1, "--"), ("AP75", 2, ":"))
# panoptic quality per epoch (log keys test_PQ_all, ...: {'pq', 'sq', 'rq', 'n'}), for runs with masks
PQ_ENTRIES = (("PQ", "test_PQ_all", "-"), ("PQ things", "test_PQ_th", "--"),
              ("PQ stuff", "test_PQ_st", ":"))
MASK_LOSSES = (("focal", "loss_mask", "-"), ("dice", "loss_dice", "--"))


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    return plt


def _epoch_axis(ax):
    from matplotlib.ticker import MaxNLocator
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def read_log(folder):
    """The per-epoch records of `folder`/log.txt (a JSON object per line), as a list of dicts."""
    path = Path(folder) / "log.txt"
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; pass the --output_dir of a training run")
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no log.txt; pass the --output_dir of a training run "
                                f"(log.txt is written after every epoch)")
    records = []
    with path.open() as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError as err:
                raise ValueError(f"{path}, line {number} is not JSON ({err})") from None
    if not records:
        raise ValueError(f"{path} is empty: the run has not finished an epoch yet")
    return records


def _column(records, key, path):
    missing = [r.get("epoch", i) for i, r in enumerate(records) if key not in r]
    if missing:
        raise ValueError(f"{path} has no {key!r} at epoch(s) {missing[:5]}; "
                         f"its keys are {sorted(records[0])}")
    return [r[key] for r in records]


def plot_logs(folders, out, names=None):
    """Losses, class error and AP (mask AP, PQ) per epoch of `folders`, saved to `out`, returned."""
    folders = [Path(f) for f in folders]
    if not folders:
        raise ValueError("plot_logs needs at least one folder")
    names = names or [f.resolve().name or str(f) for f in folders]
    runs = []  # per folder: epochs, {log key: values}; every file is checked before drawing
    for folder in folders:
        records, path = read_log(folder), folder / "log.txt"
        keys = [f"{split}_{key}" for _, key in LOG_PANELS for split in ("train", "test")]
        columns = {k: _column(records, k, path) for k in keys + ["test_coco_eval_bbox"]}
        runs.append((_column(records, "epoch", path), columns, records, path))
    masks = all("test_coco_eval_masks" in records[0] for _, _, records, _ in runs)
    panoptic = masks and all("test_PQ_all" in records[0] for _, _, records, _ in runs)
    plt = _pyplot()
    fig, axes = plt.subplots(3 if masks else 2, 3, figsize=(15, 12.5 if masks else 8.5),
                             constrained_layout=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, ((epochs, columns, records, path), name) in enumerate(zip(runs, names)):
        colour = colours[i % len(colours)]
        for (title, key), ax in zip(LOG_PANELS, axes.flat):
            ax.plot(epochs, columns[f"train_{key}"], "-", color=colour, marker=".", label=f"{name} train")
            ax.plot(epochs, columns[f"test_{key}"], "--", color=colour, marker=".", label=f"{name} val")
            ax.set_title(title)
        _plot_ap(axes[1, 2], epochs, columns["test_coco_eval_bbox"], colour, name, "box")
        if masks:
            for label, key, style in MASK_LOSSES:
                axes[2, 0].plot(epochs, _column(records, f"train_{key}", path), style, color=colour,
                                marker=".", label=f"{name} {label} (train)")
            _plot_ap(axes[2, 1], epochs, _column(records, "test_coco_eval_masks", path), colour,
                     name, "mask")
        if panoptic:
            for label, key, style in PQ_ENTRIES:
                values = [100 * r["pq"] for r in _column(records, key, path)]  # logged as fractions
                axes[2, 2].plot(epochs, values, style, color=colour, marker=".",
                                label=f"{name} {label}")
    if masks:
        axes[2, 0].set_title("mask losses (unweighted)")
        if panoptic:
            axes[2, 2].set(title="validation panoptic quality (%)", ylim=(0, 100))
        else:
            axes[2, 2].set_visible(False)
    for ax in axes.flat:
        if ax.get_visible():
            _epoch_axis(ax)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def _plot_ap(ax, epochs, stats, colour, name, kind):
    stats = np.array(stats)
    for label, index, style in AP_ENTRIES:
        ax.plot(epochs, stats[:, index], style, color=colour, marker=".", label=f"{name} {label}")
    ax.set(title=f"validation {kind} AP", ylim=(0, 1))


def _safe_numpy_globals():
    """What a COCOeval.eval dict pickles besides containers (numpy, pycocotools' Params)."""
    from pycocotools.cocoeval import Params
    core = getattr(np, "_core", None) or np.core
    dtypes = [type(np.dtype(t)) for t in (np.float64, np.float32, np.int64, np.int32, np.bool_)]
    return [np.ndarray, np.dtype, core.multiarray._reconstruct, core.multiarray.scalar, Params, *dtypes]


def load_eval(path):
    """The COCOeval.eval dict saved by main.py (precision (T, R, K, A, M), params, ...)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; main.py writes eval.pth (with --eval) or "
                                f"eval/latest.pth (when training) into its --output_dir")
    try:
        with torch.serialization.safe_globals(_safe_numpy_globals()):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 -- every failure here means the same to the user
        raise ValueError(f"could not read {path} as an evaluation file ({err})") from None
    if not isinstance(data, dict) or "precision" not in data or "params" not in data:
        raise ValueError(f"{path} is not a COCOeval.eval dict (no 'precision' and 'params'); "
                         f"expected eval.pth or eval/latest.pth of a main.py run")
    return data


def precision_recall_curves(data):
    """{title: (recall thresholds, precision)} at IoU 0.50, 0.75, 0.50:0.95: their means are APs."""
    params = data["params"]
    iou_thresholds = np.asarray(params.iouThrs)
    # precision (T, R, K, A, M): area 'all' first, largest maxDets last; -1: no ground truth
    precision = np.asarray(data["precision"])[:, :, :, 0, -1]
    precision = np.where(precision > -1, precision, np.nan)
    selections = {}
    for iou in (0.5, 0.75):
        t = int(np.argmin(np.abs(iou_thresholds - iou)))
        selections[f"IoU {iou_thresholds[t]:.2f}"] = precision[t:t + 1]
    selections["IoU 0.50:0.95 (mean)"] = precision
    return {title: (np.asarray(params.recThrs), np.nanmean(p, axis=(0, 2)))
            for title, p in selections.items()}


def plot_precision_recall(eval_files, out, names=None):
    """precision_recall_curves of evaluation files, a panel per IoU, saved to `out` (returned)."""
    eval_files = [Path(f) for f in eval_files]
    if not eval_files:
        raise ValueError("plot_precision_recall needs at least one evaluation file")
    names = names or [str(f) for f in eval_files]
    curves = [precision_recall_curves(load_eval(f)) for f in eval_files]
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), constrained_layout=True)
    for file_curves, name in zip(curves, names):
        for ax, (title, (recall, precision)) in zip(axes, file_curves.items()):
            ax.plot(recall, precision, label=f"{name} (AP {np.nanmean(precision):.3f})")
            ax.set_title(f"precision-recall, {title}")
    for ax in axes:
        ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="lower left")
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def eval_file_of(folder):
    """The evaluation file a main.py output folder holds (eval/latest.pth, else eval.pth), or None."""
    candidates = (Path(folder) / "eval" / "latest.pth", Path(folder) / "eval.pth")
    return next((candidate for candidate in candidates if candidate.is_file()), None)


def main(argv=None):
    parser = argparse.ArgumentParser(
        "python -m util.plot_utils",
        description="Plot losses and AP per epoch of main.py output folders (log.txt), and their "
                    "precision-recall curves (eval/latest.pth or eval.pth) where present.")
    parser.add_argument("folders", nargs="+", help="--output_dir folders of main.py runs")
    parser.add_argument("--out", default="plots.png", help="the curves' PNG; the precision-recall "
                                                           "curves go to OUT_pr.png")
    parser.add_argument("--names", nargs="+", help="legend names, one per folder (default: folder names)")
    args = parser.parse_args(argv)
    if args.names and len(args.names) != len(args.folders):
        parser.error(f"--names has {len(args.names)} names for {len(args.folders)} folders")
    names = args.names or [Path(f).resolve().name for f in args.folders]
    try:
        written = [plot_logs(args.folders, args.out, names)]
        with_eval = [(eval_file_of(f), n) for f, n in zip(args.folders, names) if eval_file_of(f)]
        if with_eval:
            out = Path(args.out)
            pr_out = out.with_name(f"{out.stem}_pr{out.suffix or '.png'}")
            written.append(plot_precision_recall([f for f, _ in with_eval], pr_out,
                                                 [n for _, n in with_eval]))
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    print("wrote " + ", ".join(str(p) for p in written))


if __name__ == "__main__":
    main(sys.argv[1:])
