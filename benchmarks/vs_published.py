"""Side by side: the published iRPE-DETR code at its fastest, this repository, and plain DETR.

    python benchmarks/vs_published.py --published PATH/TO/Cream/iRPE/DETR-with-iRPE

Targets: the encoder attention layer (train, dropout 0.1, fwd + bwd), the iRPE-on-k module
(fwd + bwd), a DETR-R50 training step and inference at COCO sizes. The published code runs with
its compiled rpe_ops (when built in place) and on its PyTorch path; "ratio" is against the faster.
Each side runs in a process of its own with one common state dict (benchmarks/sides.py), no side
gets a process-wide setting another lacks, and "max rel diff" compares outputs and gradients with
dropout off. docs/speed-and-gpu.md explains the options and the table.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import sides

TARGETS = ("attention", "irpe_k", "train_step", "inference")
MAP_HW = (25, 38)
IMAGE_SIZES = [(800, 1199), (800, 1066)]  # the COCO validation sizes of 640x427 and 640x480
# ratio goals (fastest published / ours), the float32 rows of the target
RATIO_GOALS = {"cpu": {"attention": 3.0, "irpe_k": 6.0, "train_step": 2.0, "inference": 2.0},
               "cuda": {"train_step": 1.6, "inference": 1.5}}
IRPE_OVERHEAD_GOAL, AMP_GOAL, MEMORY_GOAL = 1.10, 1.3, 1.1  # the GPU's, training step
PUBLISHED = ("published", "published_py")


# ------------------------------------------------------------------------------------------
# worker: one side, one target, all its variants (batch size, dtype), in its own process

def attention_layer(side, device):
    from models.rpe_attention import RPEMultiheadAttention, irpe
    config = None
    if side != "plain":
        method = irpe.METHOD.PRODUCT if sides.code(side) == "published" else "product"
        config = irpe.get_rpe_config(ratio=2.0, method=method, mode="ctx", shared_head=True,
                                     skip=0, rpe_on="k")
    return RPEMultiheadAttention(256, 8, dropout=0.1, rpe_config=config).to(device)


def call_attention(side, layer, src, pad):
    # as each side's encoder layer calls it (the published one asks for the weights)
    kwargs = {"need_weights": False} if sides.code(side) == "ours" else {}
    return layer(src, src, value=src, key_padding_mask=pad, hw=MAP_HW, **kwargs)[0]


def build_target(side, target, data, device, amp):
    """(step(batch, dtype), check(batch)): step runs the timed work once (dtype: None or the
    autocast dtype), check the float32 run with every dropout off, returning named tensors."""
    import torch
    if target in ("attention", "irpe_k"):
        layer = attention_layer(side, device)
        layer.load_state_dict({k: v for k, v in data["attention_state"].items()
                               if k in layer.state_dict()})
        if target == "attention":
            src = data["src"].to(device).requires_grad_()
            pad, grad = data["pad"].to(device), data["grad_src"].to(device)

            def step(batch, dtype):
                with torch.autocast(device, dtype, enabled=dtype is not None):
                    out = call_attention(side, layer, src, pad)
                out.float().backward(grad)

            def check(batch):
                layer.eval()
                layer.zero_grad()
                src.grad = None
                out = call_attention(side, layer, src, pad)
                out.backward(grad)
                return {"out": out, "grad_src": src.grad,
                        **{f"grad.{n}": p.grad for n, p in layer.named_parameters()}}
            layer.train()
            return step, check
        module = layer.rpe_k
        x = data["q"].to(device).requires_grad_()
        grad = data["grad_rpe"].to(device)

        def step(batch, dtype):
            module(x, *MAP_HW).backward(grad)

        def check(batch):
            x.grad = None
            module.zero_grad()
            out = module(x, *MAP_HW)
            out.backward(grad)
            return {"out": out, "grad_x": x.grad,
                    **{f"grad.{n}": p.grad for n, p in module.named_parameters()}}
        return step, check

    import util.misc as utils
    model, criterion, postprocessors, args = sides.build(side, device, data["model_state"])
    images = [im.to(device) for im in data["images"]]
    targets = [{k: v.to(device) for k, v in t.items()} for t in data["targets"]]
    sizes = torch.tensor([im.shape[-2:] for im in images], device=device)

    def forward(batch, dtype):
        return amp.forward(model, utils.nested_tensor_from_tensor_list(images[:batch]), device,
                           dtype)
    if target == "inference":
        model.eval()

        def step(batch, dtype):
            with torch.no_grad():
                postprocessors["bbox"](forward(batch, dtype), sizes[:batch])

        def check(batch):
            with torch.no_grad():
                out = forward(batch, None)
            return {"pred_logits": out["pred_logits"], "pred_boxes": out["pred_boxes"]}
        return step, check

    optimizer = sides.optimizer(side, model, args, device)
    model.train()
    criterion.train()

    def loss(batch, dtype):
        outputs = forward(batch, dtype)
        losses = criterion(outputs, targets[:batch])
        weights = criterion.weight_dict
        return sum(losses[k] * weights[k] for k in losses if k in weights), losses, outputs

    def step(batch, dtype):
        total, _, _ = loss(batch, dtype)
        optimizer.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_max_norm)
        optimizer.step()

    def check(batch):
        model.load_state_dict(sides.state_for(side, data["model_state"]), strict=True)
        sides.no_dropout(model)
        optimizer.zero_grad()
        total, losses, outputs = loss(batch, None)
        total.backward()
        named = dict(model.named_parameters())
        probe = [n for n in data["probe_params"] if n in named and named[n].grad is not None]
        return {"pred_logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"],
                "loss": total.detach(), **{f"loss.{k}": v.detach() for k, v in losses.items()
                                           if k in criterion.weight_dict},
                **{f"grad.{n}": named[n].grad for n in probe}}
    return step, check


def worker(opts):
    if opts.keep_freed_memory:
        sides.keep_freed_memory()
    import torch
    torch.set_num_threads(opts.threads)
    sides.enter(opts.side, opts.published)
    result = {"irpe_path": sides.irpe_path(opts.side), "variants": {}}
    if opts.side == "published" and result["irpe_path"] != "extension":
        print("RESULT " + json.dumps(result), flush=True)  # its extension is not built
        return
    data = torch.load(os.path.join(opts.tmp, "data.pt"), weights_only=False)
    device = opts.device
    step, check = build_target(opts.side, opts.target, data, device,
                               sides.repo_module("util/amp.py"))

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()
    variants = opts.variants.split(",")
    for variant in variants:
        batch, dtype = variant.split("/")
        batch, dtype = int(batch), {"fp32": None, "bf16": torch.bfloat16}[dtype]
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        try:
            for i in range(opts.warmup + opts.repeats):
                sync()
                start = time.perf_counter()
                step(batch, dtype)
                sync()
                if i >= opts.warmup:
                    times.append(time.perf_counter() - start)
        except (RuntimeError, NotImplementedError) as error:  # e.g. a dtype its kernels lack
            result["variants"][variant] = {"error": str(error).splitlines()[0]}
            continue
        result["variants"][variant] = {"times": times}
        if device == "cuda":
            result["variants"][variant]["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    if opts.check:
        # full float32 arithmetic on GPUs (TF32 rounding would hide real differences)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.manual_seed(0)
        outputs = check(int(variants[0].split("/")[0]))
        outputs = {k: v.detach().float().cpu() for k, v in outputs.items() if v is not None}
        torch.save(outputs, os.path.join(opts.tmp, f"check_{opts.side}_{opts.target}.pt"))
    print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------
# driver

def make_data(tmp, n_images):
    """One set of weights and inputs for every side, from this repository's model builder."""
    import torch
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    torch.manual_seed(0)
    images = [(torch.rand(3, h, w) - mean) / std
              for h, w in [IMAGE_SIZES[i % len(IMAGE_SIZES)] for i in range(n_images)]]
    state = sides.common_state(tmp, images[:2])
    torch.manual_seed(0)
    layer = attention_layer("ours", "cpu")
    with torch.no_grad():
        for p in layer.rpe_k.parameters():
            p.normal_(0, 0.05)
    length = MAP_HW[0] * MAP_HW[1]
    pad = torch.zeros(2, *MAP_HW, dtype=torch.bool)
    pad[1, :, 30:] = True  # the second image is narrower
    data = {"attention_state": layer.state_dict(), "src": torch.randn(length, 2, 256),
            "pad": pad.flatten(1), "grad_src": torch.randn(length, 2, 256),
            "q": torch.randn(2, 8, length, 32) * 32 ** -0.5,
            "grad_rpe": torch.randn(2, 8, length, length), "model_state": state,
            "images": images,
            "targets": [{"labels": torch.randint(1, 91, (n,)),
                         "boxes": torch.cat([torch.rand(n, 2) * 0.6 + 0.2,
                                             torch.rand(n, 2) * 0.3 + 0.05], 1)}
                        for n in [(7, 4)[i % 2] for i in range(n_images)]]}
    data["probe_params"] = [n for n in state if "lookup_table" in n or "layer4.2.conv3" in n
                            or "class_embed" in n or "bbox_embed.layers.2" in n
                            or "encoder.layers.0.self_attn.in_proj_weight" in n]
    torch.save(data, os.path.join(tmp, "data.pt"))


def max_relative_difference(tmp, target):
    """(largest difference, tensor, {tensor: difference}) of ours against the published sides
    that ran, relative to each tensor's largest value."""
    import torch
    ours = torch.load(os.path.join(tmp, f"check_ours_{target}.pt"))
    differences = {}
    for side in PUBLISHED:
        path = os.path.join(tmp, f"check_{side}_{target}.pt")
        if not os.path.exists(path):
            continue
        published = torch.load(path)
        if set(ours) != set(published):
            return float("nan"), f"different outputs from {side}", {}
        for key, a in ours.items():
            b = published[key]
            d = (a - b).abs().max().item() / (b.abs().max().item() or 1.0)
            differences[key] = max(d, differences.get(key, 0.0))
    where = max(differences, key=differences.get)
    return differences[where], where, differences


def measure(opts, target, variants, side_names):
    """{side: {variant: {"ms": median, "peak_gib": ...}}} over opts.rounds alternations; drops
    'published' from side_names when its extension is not built."""
    runs = {}
    for r in range(opts.rounds):
        for side in list(side_names):
            if target == "irpe_k" and side == "plain":
                continue
            repeats = opts.repeats or (3 if target in ("train_step", "inference") else 10)
            argv = ["--target", target, "--variants", ",".join(variants), "--published",
                    opts.published, "--device", opts.device, "--repeats", str(repeats),
                    "--warmup", str(opts.warmup)] + ["--check"] * (r == 0 and side != "plain")
            argv += ["--keep-freed-memory"] * opts.keep_freed_memory
            result = sides.spawn(__file__, side, opts.tmp, opts.threads, argv,
                                 opts.keep_freed_memory)
            if side == "published" and result["irpe_path"] != "extension":
                side_names.remove(side)
                print("the published rpe_ops extension is not built: its column stays empty")
                continue
            if side == "published_py" and result["irpe_path"] != "pytorch":
                sys.exit("the published code found its extension although it was off sys.path")
            for variant, v in result["variants"].items():
                entry = runs.setdefault(side, {}).setdefault(variant, {"times": []})
                entry["times"] += v.get("times", [])
                entry["peak_gib"] = max(entry.get("peak_gib", 0.0), v.get("peak_gib", 0.0))
                if "error" in v:
                    entry["error"] = v["error"]
    return {side: {variant: {"ms": 1000 * statistics.median(v["times"]) if v["times"] else None,
                             "peak_gib": v["peak_gib"] or None, "error": v.get("error")}
                   for variant, v in per_side.items()}
            for side, per_side in runs.items()}


def target_rows(opts, target, variants, measured):
    check_variant = variants[0]
    diff = max_relative_difference(opts.tmp, target)
    rows = []
    for variant in variants:
        ms = {side: m[variant]["ms"] for side, m in measured.items() if m[variant]["ms"]}
        peak = {side: m[variant]["peak_gib"] for side, m in measured.items()}
        errors = {side: m[variant]["error"] for side, m in measured.items()
                  if m[variant]["error"]}
        fastest = min((s for s in PUBLISHED if s in ms), key=ms.get)
        batch, dtype = variant.split("/")
        row = {"target": target, "batch": int(batch), "dtype": dtype, "ms": ms, "peak_gib": peak,
               "fastest": fastest, "ratio": ms[fastest] / ms["ours"], "errors": errors,
               "goal": RATIO_GOALS[opts.device].get(target) if dtype == "fp32" else None,
               "ours_vs_plain": ms["ours"] / ms["plain"] if "plain" in ms else None}
        if variant == check_variant:
            row.update(zip(("max_rel_diff", "where", "differences"), diff))
        rows.append(row)
    return rows


def print_table(rows, opts):
    plain = any("plain" in r["ms"] for r in rows)
    ms = {"plain": "plain ms", "published": "published ext ms", "published_py": "published py ms"}
    # (title, alignment and width, format, the row's value or None)
    columns = [("target", "<10", "{}", lambda r: r["target"]),
               ("batch", ">5", "{}", lambda r: r["batch"]),
               ("dtype", ">5", "{}", lambda r: r["dtype"])]
    columns += [(title, f">{len(title)}", "{:.1f}", lambda r, s=s: r["ms"].get(s))
                for s, title in ms.items() if plain or s != "plain"]
    columns += [("fastest ms", ">10", "{:.1f}", lambda r: r["ms"][r["fastest"]]),
                ("ours ms", ">8", "{:.1f}", lambda r: r["ms"]["ours"]),
                ("ratio", ">6", "{:.2f}x", lambda r: r["ratio"]),
                ("goal", ">5", "{:.1f}x", lambda r: r["goal"])]
    if plain:
        columns += [("ours/plain", ">10", "{:.2f}x", lambda r: r["ours_vs_plain"])]
    if opts.device == "cuda":  # peak memory; "pub": the fastest published side's
        columns += [("plain GiB", ">9", "{:.2f}", lambda r: r["peak_gib"].get("plain"))] * plain
        columns += [("pub GiB", ">7", "{:.2f}", lambda r: r["peak_gib"][r["fastest"]]),
                    ("ours GiB", ">8", "{:.2f}", lambda r: r["peak_gib"]["ours"])]
    columns += [("max rel diff", ">12", "{:.1e}", lambda r: r.get("max_rel_diff")),
                ("where", "", "{}", lambda r: r.get("where", ""))]

    def cell(value, align, number):
        return format("-" if value is None else number.format(value), align)
    print(" ".join(format(title, align) for title, align, _, _ in columns).rstrip())
    for row in rows:
        print(" ".join(cell(get(row), align, number) for _, align, number, get in columns).rstrip())
    print()


def print_goals(rows, device):
    def verdict(value, goal, at_least=True):
        met = value >= goal if at_least else value <= goal
        return (f"{value:.2f}x (goal {'>=' if at_least else '<='} {goal}x): "
                f"{'met' if met else 'MISSED'}")
    print(f"goals ({device}):")
    for r in rows:
        name = f"{r['target']} batch {r['batch']} {r['dtype']}"
        if r["goal"]:
            print(f"  {name}: ours vs fastest published {verdict(r['ratio'], r['goal'])}")
        if r["target"] != "train_step" or r["ours_vs_plain"] is None:
            continue
        print(f"  {name}: iRPE overhead, ours / plain "
              f"{verdict(r['ours_vs_plain'], IRPE_OVERHEAD_GOAL, False)}")
        if r["peak_gib"].get("plain"):
            print(f"  {name}: peak memory, ours / plain "
                  f"{verdict(r['peak_gib']['ours'] / r['peak_gib']['plain'], MEMORY_GOAL, False)}")
    for r in rows:
        fp32 = [f for f in rows if f["target"] == "train_step" and f["batch"] == r["batch"]
                and f["dtype"] == "fp32"]
        if r["target"] == "train_step" and r["dtype"] == "bf16" and fp32:
            print(f"  train_step batch {r['batch']}: --amp, ours fp32 / ours bf16 "
                  f"{verdict(fp32[0]['ms']['ours'] / r['ms']['ours'], AMP_GOAL)}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--published", required=True,
                        help="folder of the published iRPE-DETR code (DETR-with-iRPE)")
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-batch", default="2", help="batch sizes of train_step, e.g. 2,4")
    parser.add_argument("--infer-batch", default="1", help="batch sizes of inference, e.g. 1,8")
    parser.add_argument("--plain", action="store_true", help="also time plain DETR")
    parser.add_argument("--amp", action="store_true", help="also time bf16 autocast, every side")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="every side with this repository's malloc setting")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the sides")
    parser.add_argument("--repeats", type=int, default=0, help="timed runs per round (0: auto)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--deadline", type=float, default=0,
                        help="seconds after which no further target starts (0: none)")
    parser.add_argument("--json", help="also write the rows as JSON to this file")
    for hidden in ("--side", "--tmp", "--target", "--variants"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    for hidden in ("--worker", "--check"):
        parser.add_argument(hidden, action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.worker:
        return worker(opts)
    opts.published = sides.check_published(opts.published)
    targets = [t for t in opts.targets.split(",") if t]
    unknown = set(targets) - set(TARGETS)
    if unknown:
        sys.exit(f"unknown targets {sorted(unknown)}; choose from {', '.join(TARGETS)}")
    batches = {"train_step": [int(b) for b in opts.train_batch.split(",")],
               "inference": [int(b) for b in opts.infer_batch.split(",")]}
    side_names = ["plain"] * opts.plain + list(PUBLISHED) + ["ours"]
    rows, start = [], time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        opts.tmp = tmp
        make_data(tmp, max(max(b) for b in batches.values()))
        for target in targets:
            if opts.deadline and time.monotonic() - start > opts.deadline:
                print(f"{target}: not run (--deadline {opts.deadline:g} s passed)")
                continue
            dtypes = ["fp32"] + ["bf16"] * (opts.amp and target != "irpe_k")
            variants = [f"{b}/{d}" for b in batches.get(target, [2]) for d in dtypes]
            rows += target_rows(opts, target, variants,
                                measure(opts, target, variants, side_names))
            print(f"{target}: done after {time.monotonic() - start:.0f} s", flush=True)
    import torch
    print(f"\n{opts.device}, {opts.threads} threads, torch {torch.__version__}, "
          f"{opts.rounds} rounds; malloc setting of util/cpu_allocator.py: "
          f"{'every side' if opts.keep_freed_memory else 'no side'}; milliseconds are medians")
    print_table(rows, opts)
    print_goals(rows, opts.device)
    for row in rows:
        for side, error in row["errors"].items():
            print(f"{row['target']} batch {row['batch']} {row['dtype']}: {side} failed: {error}")
        if row.get("max_rel_diff", 0) > 1e-5:
            print(f"{row['target']}: relative differences above 1e-5: " + ", ".join(
                f"{k} {v:.1e}" for k, v in sorted(row["differences"].items(), key=lambda kv: -kv[1])
                if v > 1e-5))
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"device": opts.device, "threads": opts.threads, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
