"""Side by side: the published iRPE-DETR code and this repository, same weights, same inputs.

    python benchmarks/vs_published.py --published PATH/TO/Cream/iRPE/DETR-with-iRPE

PATH is a checkout of the published code (its rpe_ops built in place with
`cd rpe_ops && python setup.py build_ext --inplace`, else it runs its Python fallback; its
requirements, e.g. easydict, installed). Nothing of it is copied here: each side runs in a
process of its own that imports that side's `models`, `util` and `main` (the packages share
names), builds its model with its own `main.get_args_parser()` and `models.build_model`, loads one
common state dict (strict) and times the same inputs. Rounds alternate the two sides. Targets:

    attention   encoder self-attention layer (rpe-2.0-product-ctx-1-k, 256 wide, 8 heads,
                dropout 0.1), train mode, forward + backward, COCO map size 25x38, batch 2
    irpe_k      its iRPE-on-k module alone, forward + backward, (2, 8, 950, 32) -> 81 buckets
    train_step  DETR-R50 + iRPE, batch 2 at 800x1199 / 800x1066, loss, backward, clipping, AdamW
    inference   DETR-R50 + iRPE, eval mode, batch 1 at 800x1199, forward and PostProcess

Each side also runs its target once with every dropout off and saves outputs and gradients;
the table's last columns are their largest difference relative to each tensor's scale, and the
tensor where it is. Each side runs as its own training would: this repository's main.py keeps
freed memory for reuse (util/cpu_allocator.py), so our side runs with that, and with
--published-allocator the published side does too.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = ("attention", "irpe_k", "train_step", "inference")
GOALS = {"attention": 2.5, "irpe_k": 8.0, "train_step": 1.3, "inference": 1.5}
RPE = "rpe-2.0-product-ctx-1-k"
MAP_HW = (25, 38)
IMAGE_SIZES = {"train_step": [(800, 1199), (800, 1066)], "inference": [(800, 1199)]}


# ------------------------------------------------------------------------------------------
# worker: one side, one target, in its own process

def import_side(side, published):
    root = published if side == "published" else REPO
    sys.path.insert(0, root)
    if side == "published":
        sys.path.insert(1, os.path.join(root, "rpe_ops"))  # its extension module rpe_index_cpp
    import torch  # noqa: F401


def side_args(side, device):
    import main
    common = ["--enc_rpe2d", RPE, "--device", device, "--coco_path", "unused",
              "--num_classes", "91"]
    if side == "ours":
        common += ["--backbone_weights", "none"]
    return main.get_args_parser().parse_args(common)


def no_dropout(module):
    import torch
    for m in module.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        elif isinstance(getattr(m, "dropout", None), float):
            m.dropout = 0.0


def attention_layer(side, device):
    from models.rpe_attention import RPEMultiheadAttention, irpe
    if side == "published":
        config = irpe.get_rpe_config(ratio=2.0, method=irpe.METHOD.PRODUCT, mode="ctx",
                                     shared_head=True, skip=0, rpe_on="k")
    else:
        config = irpe.get_rpe_config(ratio=2.0, method="product", mode="ctx", shared_head=True,
                                     skip=0, rpe_on="k")
    return RPEMultiheadAttention(256, 8, dropout=0.1, rpe_config=config).to(device)


def call_attention(side, layer, src, pad):
    # as each side's encoder layer calls it (the published one asks for the weights)
    kwargs = {} if side == "published" else {"need_weights": False}
    return layer(src, src, value=src, key_padding_mask=pad, hw=MAP_HW, **kwargs)[0]


def build_target(side, target, data, device, amp):
    """Returns (step(), check()): step runs the timed work once, check the dropout-free run."""
    import torch
    if target in ("attention", "irpe_k"):
        layer = attention_layer(side, device)
        layer.load_state_dict(data["attention_state"])
        if target == "attention":
            src = data["src"].to(device).requires_grad_()
            pad = data["pad"].to(device)

            def step():
                with torch.autocast(device, torch.bfloat16, enabled=amp):
                    out = call_attention(side, layer, src, pad)
                out.float().backward(data["grad_src"].to(device))

            def check():
                layer.eval()
                layer.zero_grad()
                src.grad = None
                out = call_attention(side, layer, src, pad)
                out.backward(data["grad_src"].to(device))
                return {"out": out, "grad_src": src.grad,
                        **{f"grad.{n}": p.grad for n, p in layer.named_parameters()}}
            layer.train()
            return step, check
        module = layer.rpe_k
        x = data["q"].to(device).requires_grad_()
        grad = data["grad_rpe"].to(device)

        def step():
            module(x, *MAP_HW).backward(grad)

        def check():
            x.grad = None
            module.zero_grad()
            out = module(x, *MAP_HW)
            out.backward(grad)
            return {"out": out, "grad_x": x.grad,
                    **{f"grad.{n}": p.grad for n, p in module.named_parameters()}}
        return step, check

    from models import build_model
    import util.misc as utils
    args = side_args(side, device)
    model, criterion, postprocessors = build_model(args)
    model.load_state_dict(data["model_state"], strict=True)
    model.to(device)
    images = [im.to(device) for im in data[f"images_{target}"]]
    targets = [{k: v.to(device) for k, v in t.items()} for t in data["targets"][:len(images)]]
    sizes = torch.tensor([im.shape[-2:] for im in images], device=device)

    def forward():
        # as main.py's --amp: the model under autocast, its outputs back in float32 for the
        # matcher (scipy takes no bfloat16), the losses and the post-processing
        if not amp:
            return model(utils.nested_tensor_from_tensor_list(images))
        from util.amp import to_float32  # our side only: --amp does not time the published one
        with torch.autocast(device, torch.bfloat16):
            return to_float32(model(utils.nested_tensor_from_tensor_list(images)))
    if target == "inference":
        model.eval()

        def step():
            with torch.no_grad():
                postprocessors["bbox"](forward(), sizes)

        def check():
            with torch.no_grad():
                out = model(utils.nested_tensor_from_tensor_list(images))
            return {"pred_logits": out["pred_logits"], "pred_boxes": out["pred_boxes"]}
        return step, check

    groups = [{"params": [p for n, p in model.named_parameters()
                          if "backbone" not in n and p.requires_grad]},
              {"params": [p for n, p in model.named_parameters()
                          if "backbone" in n and p.requires_grad], "lr": args.lr_backbone}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
    weights = criterion.weight_dict
    model.train()
    criterion.train()

    def loss():
        outputs = forward()
        losses = criterion(outputs, targets)
        return sum(losses[k] * weights[k] for k in losses if k in weights), losses, outputs

    def step():
        total, _, _ = loss()
        optimizer.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_max_norm)
        optimizer.step()

    def check():
        model.load_state_dict(data["model_state"], strict=True)
        no_dropout(model)
        optimizer.zero_grad()
        total, losses, outputs = loss()
        total.backward()
        named = dict(model.named_parameters())
        probe = [n for n in data["probe_params"] if named[n].grad is not None]
        return {"pred_logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"],
                "loss": total.detach(), **{f"loss.{k}": v.detach() for k, v in losses.items()
                                           if k in weights},
                **{f"grad.{n}": named[n].grad for n in probe}}
    return step, check


def worker(opts):
    if opts.side == "ours" or opts.published_allocator:
        sys.path.insert(0, REPO)
        from util.cpu_allocator import keep_freed_memory
        keep_freed_memory()
        sys.path.remove(REPO)
    import torch
    torch.set_num_threads(opts.threads)
    import_side(opts.side, opts.published)
    data = torch.load(os.path.join(opts.tmp, "data.pt"), weights_only=False)
    device = opts.device
    step, check = build_target(opts.side, opts.target, data, device, opts.amp)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()
    times = []
    for i in range(opts.warmup + opts.repeats):
        sync()
        start = time.perf_counter()
        step()
        sync()
        if i >= opts.warmup:
            times.append(time.perf_counter() - start)
    result = {"times": times}
    if opts.check:
        # full float32 arithmetic on GPUs (TF32 rounding would hide real differences)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.manual_seed(0)
        outputs = {k: v.detach().float().cpu() for k, v in check().items() if v is not None}
        torch.save(outputs, os.path.join(opts.tmp, f"check_{opts.side}_{opts.target}.pt"))
    if device == "cuda":
        result["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------
# driver

def make_data(tmp):
    """One set of weights and inputs for both sides, from this repository's model builder."""
    import torch
    import torchvision
    sys.path.insert(0, REPO)
    torch.manual_seed(0)
    from models import build_model
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
            "grad_rpe": torch.randn(2, 8, length, length)}
    model = build_model(side_args("ours", "cpu"))[0]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lookup_table" in name:
                p.normal_(0, 0.05)
    data["model_state"] = model.state_dict()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    data["probe_params"] = [n for n in trainable if "lookup_table" in n or "layer4.2.conv3" in n
                            or "class_embed" in n or "bbox_embed.layers.2" in n
                            or "encoder.layers.0.self_attn.in_proj_weight" in n]
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    for target, sizes in IMAGE_SIZES.items():
        data[f"images_{target}"] = [(torch.rand(3, h, w) - mean) / std for h, w in sizes]
    data["targets"] = [{"labels": torch.randint(1, 91, (n,)),
                        "boxes": torch.cat([torch.rand(n, 2) * 0.6 + 0.2,
                                            torch.rand(n, 2) * 0.3 + 0.05], 1)}
                       for n in (7, 4)]
    torch.save(data, os.path.join(tmp, "data.pt"))
    # the published backbone asks torchvision for ImageNet weights, offline here: a cached file
    # of the right name (its values are replaced by the common state dict anyway)
    url = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url
    hub = os.path.join(tmp, "torch_home", "hub", "checkpoints")
    os.makedirs(hub, exist_ok=True)
    torch.save(torchvision.models.resnet50().state_dict(), os.path.join(hub, os.path.basename(url)))


def run_worker(opts, side, target, check, amp=False):
    env = dict(os.environ, TORCH_HOME=os.path.join(opts.tmp, "torch_home"),
               OMP_NUM_THREADS=str(opts.threads), PYTHONWARNINGS="ignore")
    repeats = opts.repeats or (3 if target in ("train_step", "inference") else 10)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--side", side,
           "--target", target, "--tmp", opts.tmp, "--published", opts.published,
           "--device", opts.device, "--threads", str(opts.threads),
           "--repeats", str(repeats), "--warmup", str(opts.warmup)]
    cmd += ["--check"] if check else []
    cmd += ["--amp"] if amp else []
    cmd += ["--published-allocator"] if opts.published_allocator else []
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=opts.tmp)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    sys.exit(f"the {side} side of {target} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")


def max_relative_difference(tmp, target):
    import torch
    ours = torch.load(os.path.join(tmp, f"check_ours_{target}.pt"))
    published = torch.load(os.path.join(tmp, f"check_published_{target}.pt"))
    if set(ours) != set(published):
        return float("nan"), "different outputs", {}
    differences = {}
    for key, a in ours.items():
        b = published[key]
        differences[key] = (a - b).abs().max().item() / (b.abs().max().item() or 1.0)
    where = max(differences, key=differences.get)
    return differences[where], where, differences


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--published", required=True,
                        help="folder of the published iRPE-DETR code (DETR-with-iRPE)")
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the two sides")
    parser.add_argument("--repeats", type=int, default=0, help="timed runs per round (0: auto)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--amp", action="store_true",
                        help="also time our side under bf16 autocast (its own column)")
    parser.add_argument("--published-allocator", action="store_true",
                        help="give the published side our malloc settings too")
    parser.add_argument("--json", help="also write the table as JSON to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    parser.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.worker:
        return worker(opts)
    opts.published = os.path.abspath(opts.published)
    if not os.path.isfile(os.path.join(opts.published, "models", "rpe_attention", "irpe.py")):
        sys.exit(f"--published {opts.published} is not the published DETR-with-iRPE folder "
                 "(it has no models/rpe_attention/irpe.py)")
    targets = [t for t in opts.targets.split(",") if t]
    unknown = set(targets) - set(TARGETS)
    if unknown:
        sys.exit(f"unknown targets {sorted(unknown)}; choose from {', '.join(TARGETS)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        opts.tmp = tmp
        make_data(tmp)
        for target in targets:
            times = {"published": [], "ours": [], "ours_amp": []}
            for r in range(opts.rounds):
                for side in ("published", "ours"):
                    times[side] += run_worker(opts, side, target, check=r == 0)["times"]
                if opts.amp and target != "irpe_k":
                    times["ours_amp"] += run_worker(opts, "ours", target, False, amp=True)["times"]
            row = {"target": target,
                   "published_ms": 1000 * statistics.median(times["published"]),
                   "ours_ms": 1000 * statistics.median(times["ours"]),
                   **dict(zip(("max_rel_diff", "where", "differences"),
                              max_relative_difference(tmp, target)))}
            row["ratio"] = row["published_ms"] / row["ours_ms"]
            if times["ours_amp"]:
                row["ours_amp_ms"] = 1000 * statistics.median(times["ours_amp"])
                row["ratio_amp"] = row["published_ms"] / row["ours_amp_ms"]
            rows.append(row)
            print_row(row, header=len(rows) == 1, amp=opts.amp)
    for row in rows:
        if row["max_rel_diff"] > 1e-5:
            print(f"{row['target']}: relative differences above 1e-5: " + ", ".join(
                f"{k} {v:.1e}" for k, v in sorted(row["differences"].items(), key=lambda kv: -kv[1])
                if v > 1e-5))
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"device": opts.device, "threads": opts.threads, "rows": rows}, f, indent=1)


def print_row(row, header, amp):
    if header:
        cols = f"{'target':<11} {'published ms':>13} {'ours ms':>10} {'ratio':>7} {'goal':>6}"
        cols += f" {'ours amp ms':>12} {'ratio':>7}" if amp else ""
        print(cols + f" {'max rel diff':>13}  where")
    line = (f"{row['target']:<11} {row['published_ms']:>13.1f} {row['ours_ms']:>10.1f} "
            f"{row['ratio']:>6.2f}x {GOALS[row['target']]:>5.1f}x")
    if amp:
        line += (f" {row['ours_amp_ms']:>12.1f} {row['ratio_amp']:>6.2f}x" if "ours_amp_ms" in row
                 else f" {'-':>12} {'-':>7}")
    print(line + f" {row['max_rel_diff']:>13.1e}  {row['where']}", flush=True)


if __name__ == "__main__":
    main()
