"""How far one training step's float32 gradients and parameters are from float64, for this
repository and for the published iRPE-DETR code.

    python benchmarks/grad_precision.py --published PATH/TO/Cream/iRPE/DETR-with-iRPE

One AdamW step of the model zoo's configuration on two scikit-image photographs (batch 2, dropout
off) from one common state dict: float64 on the published PyTorch path is the reference; ours in
float64 must agree with it to float64 rounding; ours in float32 as main.py trains, with each fast
path off in turn (FAST_PATHS) and all off, and the published float32 runs, are compared with it
(error: max |x32 - x64| / max |x64| per tensor). The target: ours' worst error at most
TARGET_RATIO times the published code's. docs/speed-and-gpu.md shows a run.
"""
import argparse
import json
import os
import sys
import tempfile

import sides

PHOTOS = {  # scikit-image's photographs, with boxes (x0, y0, x1, y1 in its pixels) and COCO labels
    "astronaut": [((20, 15, 365, 512), 1), ((355, 0, 470, 285), 5)],  # person, airplane
    "coffee": [((172, 18, 410, 305), 47), ((325, 65, 425, 325), 50), ((0, 0, 600, 400), 67)],
}
FAST_PATHS = ("fused_attention", "channels_last", "fused_adamw")
TARGET_RATIO = 1.5  # ours' worst error at most this times the published code's


# ------------------------------------------------------------------------------------------
# worker: runs of one side, each one training step from the common state

def switch_off(model, fast_paths):
    """Turn off this repository's fast paths by their public switches."""
    switches = {"fused_attention": ("use_fused_kernels", False),
                "channels_last": ("channels_last_min_side", float("inf"))}
    for name in fast_paths:
        if name not in switches:
            continue
        attribute, value = switches[name]
        modules = [m for m in model.modules() if hasattr(m, attribute)]
        if not modules:
            sys.exit(f"no module of the model has `{attribute}`: the switch of {name} moved")
        for m in modules:
            setattr(m, attribute, value)


def training_step(side, data, dtype, fast_paths_off):
    """Gradients (before clipping) and parameters after one AdamW step, the matcher's
    assignments and the loss."""
    import torch
    import util.misc as utils
    model, criterion, _, args = sides.build(side, "cpu", data["model_state"])
    model.to(dtype).train()
    criterion.to(dtype).train()  # its class weights too
    sides.no_dropout(model)
    switch_off(model, fast_paths_off)
    fused = False if dtype == torch.float64 or "fused_adamw" in fast_paths_off else None
    optimizer = sides.optimizer(side, model, args, "cpu", fused=fused)
    matches = []  # the assignments, to check that every run made the same
    criterion.matcher.register_forward_hook(
        lambda module, inputs, out: matches.append([[i.tolist(), j.tolist()] for i, j in out]))
    samples = utils.nested_tensor_from_tensor_list([im.to(dtype) for im in data["images"]])
    targets = [{"labels": t["labels"], "boxes": t["boxes"].to(dtype)} for t in data["targets"]]
    losses = criterion(model(samples), targets)
    total = sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict)
    optimizer.zero_grad()
    total.backward()
    named = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
    grads = {n: p.grad.detach().clone() for n, p in named}
    torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_max_norm)
    optimizer.step()
    return {"grads": grads, "params": {n: p.detach().clone() for n, p in named},
            "matches": matches, "loss": total.item()}


def worker(opts):
    import torch
    torch.set_num_threads(opts.threads)
    sides.enter(opts.side, opts.published)
    path = sides.irpe_path(opts.side)
    if opts.side == "published" and path != "extension":
        print("RESULT " + json.dumps({"irpe_path": path, "runs": []}), flush=True)
        return
    data = torch.load(os.path.join(opts.tmp, "data.pt"), weights_only=False)
    runs = []
    for run in opts.runs.split(","):
        name, dtype, *off = run.split(":")
        off = FAST_PATHS if off == ["all"] else off
        result = training_step(opts.side, data, getattr(torch, dtype), off)
        torch.save(result, os.path.join(opts.tmp, f"{name}.pt"))
        runs.append(name)
    print("RESULT " + json.dumps({"irpe_path": path, "runs": runs}), flush=True)


# ------------------------------------------------------------------------------------------
# driver

def make_data(tmp, calibrate):
    import numpy as np
    import skimage.data
    import torch
    from PIL import Image
    sys.path.insert(0, sides.REPO)
    import datasets.transforms as T
    transform = T.make_coco_transforms("val")
    images, targets = [], []
    for name, boxes in PHOTOS.items():
        photo = Image.fromarray(np.asarray(getattr(skimage.data, name)()))
        target = {"boxes": torch.tensor([b for b, _ in boxes], dtype=torch.float32),
                  "labels": torch.tensor([label for _, label in boxes])}
        image, target = transform(photo, target)
        images.append(image)
        targets.append({"labels": target["labels"], "boxes": target["boxes"]})
    state = sides.common_state(tmp, images if calibrate else None)
    torch.save({"model_state": state, "images": images, "targets": targets},
               os.path.join(tmp, "data.pt"))
    return [tuple(im.shape[-2:]) for im in images]


def errors(run, reference):
    """{tensor: error} of the gradients and of the parameters, relative to each reference
    tensor's largest value."""
    def relative(a, b):
        b = b.double()
        return ((a.double() - b).abs().max() / (b.abs().max() or 1.0)).item()
    return {kind: {n: relative(run[kind][n], reference[kind][n]) for n in reference[kind]}
            for kind in ("grads", "params")}


def worst(errs):
    where = max(errs, key=errs.get)
    return errs[where], where


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--published", required=True,
                        help="folder of the published iRPE-DETR code (DETR-with-iRPE)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--identity-batchnorm", action="store_true",
                        help="keep the frozen batch-norm statistics at their start (0 / 1)")
    parser.add_argument("--json", help="also write every error as JSON to this file")
    for hidden in ("--side", "--tmp", "--runs"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.worker:
        return worker(opts)
    opts.published = sides.check_published(opts.published)
    import torch
    plan = {  # side: runs "name:dtype[:fast paths off]"
        "published_py": ["reference:float64", "published_py:float32"],
        "ours": ["ours_float64:float64:all", "ours:float32"]
                + [f"ours-{p}:float32:{p}" for p in FAST_PATHS] + ["ours-all:float32:all"],
        "published": ["published:float32"],
    }
    with tempfile.TemporaryDirectory() as tmp:
        sizes = make_data(tmp, not opts.identity_batchnorm)
        names = []
        for side, runs in plan.items():
            result = sides.spawn(__file__, side, tmp, opts.threads,
                                 ["--published", opts.published, "--runs", ",".join(runs)])
            if side == "published_py" and result["irpe_path"] != "pytorch":
                sys.exit("the published code found its extension although it was off sys.path")
            names += result["runs"]
            print(f"{side}: {', '.join(result['runs']) or 'its extension is not built'}",
                  flush=True)
        reference = torch.load(os.path.join(tmp, "reference.pt"))
        table, matches, losses = {}, {}, {}
        for name in names:
            if name == "reference":
                continue
            run = torch.load(os.path.join(tmp, f"{name}.pt"))
            table[name] = errors(run, reference)
            matches[name] = run["matches"] == reference["matches"]
            losses[name] = abs(run["loss"] - reference["loss"]) / abs(reference["loss"])
            del run
    report(table, matches, losses, reference, sizes, opts)


def report(table, matches, losses, reference, sizes, opts):
    published = [n for n in ("published", "published_py") if n in table]
    columns = ["ours"] + published
    print(f"\none AdamW step, float32 against float64 (the published code's PyTorch path); "
          f"batch 2 at {' / '.join(f'{h}x{w}' for h, w in sizes)}, frozen batch norm "
          f"{'at its identity start' if opts.identity_batchnorm else 'calibrated'}, CPU, "
          f"{opts.threads} threads\n")
    print(f"{'tensor':<58} " + " ".join(f"{'grad ' + c:>17}" for c in columns) + " "
          + " ".join(f"{'param ' + c:>18}" for c in columns))
    for n in reference["grads"]:
        print(f"{n:<58} " + " ".join(f"{table[c]['grads'][n]:>17.1e}" for c in columns) + " "
              + " ".join(f"{table[c]['params'][n]:>18.1e}" for c in columns))
    # per run: the loss's error, the worst tensor's, and in how many tensors the error is more
    # than TARGET_RATIO times larger / smaller than the published code's (PyTorch path)
    print(f"\n{'run':<20} {'loss':>7}  {'worst gradient':<58} {'worse/better':>12}  "
          f"{'worst parameter':<61} {'worse/better':>12}")
    for name, errs in table.items():
        line = f"{name:<20} {losses[name]:>7.1e}"
        for kind, width in (("grads", 50), ("params", 53)):
            error, where = worst(errs[kind])
            base = table["published_py"][kind]
            worse = sum(errs[kind][n] > TARGET_RATIO * base[n] for n in base)
            better = sum(errs[kind][n] * TARGET_RATIO < base[n] for n in base)
            line += f"  {error:>7.1e} {where:<{width}} {f'{worse}/{better}':>12}"
        print(line)
    print("\nthe matcher's assignments equal the reference's in "
          + ("every run" if all(matches.values())
             else f"all runs but {', '.join(n for n, same in matches.items() if not same)}"))
    for kind, label in (("grads", "gradients"), ("params", "parameters after the step")):
        ours = worst(table["ours"][kind])[0]
        theirs = max(worst(table[p][kind])[0] for p in published)
        verdict = "met" if ours <= TARGET_RATIO * theirs else "MISSED"
        print(f"{label}: ours' worst {ours:.1e}, the published code's {theirs:.1e}, ratio "
              f"{ours / theirs:.2f} (target <= {TARGET_RATIO}): {verdict}")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"errors": table, "matches": matches, "loss": losses, "sizes": sizes}, f)


if __name__ == "__main__":
    main()
