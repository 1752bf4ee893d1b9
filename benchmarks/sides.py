"""The sides of a side-by-side run: this repository and the published iRPE-DETR code, each in a
process of its own (the two share the package names `models`, `util` and `main`).

A side is a name in SIDES. A worker process calls enter(side, published) before it imports
anything of the side's code; then `import models` etc. are that side's. Each side builds its
model with its own `main.get_args_parser()` and `models.build_model`, and its optimizer as its
own main.py does. Nothing here changes a process-wide setting; keep_freed_memory() is for a run
that gives it to every side alike.
"""
import importlib.util
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RPE = "rpe-2.0-product-ctx-1-k"  # the model zoo's iRPE-DETR-R50

# side: (whose code, its --enc_rpe2d, whether the published rpe_ops extension is within reach)
SIDES = {
    "plain": ("ours", "", False),              # DETR without iRPE, this repository
    "published": ("published", RPE, True),     # its compiled rpe_ops, as its README builds it
    "published_py": ("published", RPE, False),  # its irpe.py falls back to PyTorch
    "ours": ("ours", RPE, False),
}


def code(side):
    return SIDES[side][0]


def enter(side, published):
    """Put the side's code first on sys.path. The published irpe.py imports its extension as
    `rpe_index_cpp` from its rpe_ops folder, so leaving that folder off the path is what sends
    it to its PyTorch path."""
    sys.path.insert(0, published if code(side) == "published" else REPO)
    if SIDES[side][2]:
        sys.path.insert(1, os.path.join(published, "rpe_ops"))


def irpe_path(side):
    """Which bucket lookup the side's iRPE runs: 'extension' or 'pytorch' (after enter)."""
    if code(side) == "published":
        from models.rpe_attention import irpe
        return "extension" if irpe.RPEIndexFunction is not None else "pytorch"
    import rpe_ops
    return "extension" if rpe_ops.EXTENSION_AVAILABLE else "pytorch"


def repo_module(path):
    """A module of this repository loaded from its file, under a name of its own, so that it does
    not stand in for the side's package of the same name (util/amp.py imports only torch)."""
    spec = importlib.util.spec_from_file_location("_bench_" + path.replace("/", "_")[:-3],
                                                  os.path.join(REPO, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def keep_freed_memory():
    """This repository's malloc setting (util/cpu_allocator.py), for a run that gives it to
    every side."""
    repo_module("util/cpu_allocator.py").keep_freed_memory()


def parse_args(side, device):
    import main
    argv = ["--enc_rpe2d", SIDES[side][1], "--device", device, "--coco_path", "unused"]
    if code(side) == "ours":
        argv += ["--backbone_weights", "none", "--num_classes", "91"]
    return main.get_args_parser().parse_args(argv)


def state_for(side, state):
    return {k: v for k, v in state.items() if side != "plain" or "lookup_table" not in k}


def build(side, device, state):
    """(model, criterion, postprocessors, args) of the side, `state` loaded strictly (plain DETR
    takes the keys it has: all but the iRPE tables)."""
    from models import build_model
    args = parse_args(side, device)
    model, criterion, postprocessors = build_model(args)
    model.load_state_dict(state_for(side, state), strict=True)
    return model.to(device), criterion, postprocessors, args


def optimizer(side, model, args, device, fused=None):
    """AdamW as the side's main.py builds it (fused=None): this repository's main.py asks for the
    fused kernel on CPUs and GPUs, the published one for PyTorch's default (a loop over the
    tensors on the CPU, `foreach` on GPUs). fused=False: the plain loop, on either side."""
    import torch
    if fused is None:
        fused = True if code(side) == "ours" and device in ("cpu", "cuda") else None
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if "backbone" not in n]},
              {"params": [p for n, p in named if "backbone" in n], "lr": args.lr_backbone}]
    kwargs = {"fused": True} if fused else {} if fused is None else {"foreach": False}
    return torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay, **kwargs)


def no_dropout(model):
    import torch
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        elif isinstance(getattr(m, "dropout", None), float):  # the attention layers
            m.dropout = 0.0


def common_state(tmp, images=None):
    """The model zoo configuration's state dict from this repository's builder: random weights,
    the iRPE tables drawn non-zero (they start at zero) and the frozen batch-norm statistics
    calibrated on `images` as main.py does for a random backbone (at their identity start the
    activations grow by orders of magnitude through the ResNet; None: left there). And, since
    the published backbone asks torchvision for ImageNet weights (offline here), a file of that name
    under tmp/torch_home (its values are replaced by the common state)."""
    import torch
    import torchvision
    sys.path.insert(0, REPO)
    from models import build_model
    from models.backbone import calibrate_frozen_batchnorm
    from util.misc import nested_tensor_from_tensor_list
    torch.manual_seed(0)
    model = build_model(parse_args("ours", "cpu"))[0]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lookup_table" in name:
                p.normal_(0, 0.05)
        if images is not None:
            calibrate_frozen_batchnorm(model.backbone[0], nested_tensor_from_tensor_list(images))
    url = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url
    hub = os.path.join(tmp, "torch_home", "hub", "checkpoints")
    os.makedirs(hub, exist_ok=True)
    torch.save(torchvision.models.resnet50().state_dict(), os.path.join(hub, os.path.basename(url)))
    return model.state_dict()


def spawn(script, side, tmp, threads, argv, keep_freed_memory_too=False):
    """Run `script --worker --side SIDE ...` in a process of its own, in tmp; returns the JSON of
    its 'RESULT ' line. Our main.py sets the malloc option at import (util/cpu_allocator.py), so
    RPE_KEEP_FREED_MEMORY=0 keeps it off unless every side gets it."""
    env = dict(os.environ, TORCH_HOME=os.path.join(tmp, "torch_home"), PYTHONWARNINGS="ignore",
               OMP_NUM_THREADS=str(threads),
               RPE_KEEP_FREED_MEMORY="1" if keep_freed_memory_too else "0")
    cmd = [sys.executable, os.path.abspath(script), "--worker", "--side", side, "--tmp", tmp,
           "--threads", str(threads), *argv]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    sys.exit(f"the {side} worker failed ({' '.join(argv)}):\n{proc.stdout[-3000:]}\n"
             f"{proc.stderr[-5000:]}")


def check_published(path):
    path = os.path.abspath(path)
    if not os.path.isfile(os.path.join(path, "models", "rpe_attention", "irpe.py")):
        sys.exit(f"--published {path} is not the published DETR-with-iRPE folder "
                 "(it has no models/rpe_attention/irpe.py)")
    return path
