"""The encoder attention layer's paths side by side: plain PyTorch, PyTorch's SDPA (CUDA), flex
attention (CUDA) and the compiled CPU kernel (CPU), one iRPE setting and dtype per row.

    python benchmarks/attention_paths.py                         # CUDA if there is one
    python benchmarks/attention_paths.py --device cpu --repeats 5

One layer (256 wide, 8 heads, attention dropout 0, batch 2, a 25x38 map) in train mode (fwd + bwd)
and eval mode, fp32 and bf16; medians in ms, 'first' the flex path's compiling call, 'MiB' the
training step's peak memory. The last column compares flex_attention.USE_FLEX with the faster path.
"""
import argparse
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.rpe_attention import RPEMultiheadAttention, flex_attention  # noqa: E402
from models.rpe_attention.irpe import parse_rpe_string  # noqa: E402

SETTINGS = ("rpe-2.0-product-ctx-1-k", "rpe-2.0-product-bias-1-k", "rpe-1.9-cross-ctx-1-qk", "")


@contextmanager
def route(layer, path):
    """Make `layer` take `path` (plain, sdpa, flex or cpu_kernel) where its rules allow it."""
    use_flex, applies = dict(flex_attention.USE_FLEX), flex_attention.flex_applies
    layer.use_fused_kernels = path != "plain"
    for mode in flex_attention.USE_FLEX:
        flex_attention.USE_FLEX[mode] = path == "flex"
    if path == "flex":  # in eval mode too, for the comparison
        flex_attention.flex_applies = lambda lay, q, need_weights, attn_mask, kpm: (
            q.is_cuda and not need_weights and lay.rpe_v is None)
    try:
        yield
    finally:
        flex_attention.USE_FLEX.update(use_flex)
        flex_attention.flex_applies = applies


def timed(fn, device, repeats, warmup):
    def sync():
        if device == "cuda":
            torch.cuda.synchronize()
    sync()
    start = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - start
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return 1000 * first, 1000 * statistics.median(times)


def measure(setting, dtype, path, opts):
    device = opts.device
    torch.manual_seed(0)
    layer = RPEMultiheadAttention(256, 8, dropout=0.0, rpe_config=parse_rpe_string(setting))
    layer = layer.to(device)
    height, width = opts.map
    x = torch.randn(height * width, opts.batch, 256, device=device, requires_grad=True)
    pad = torch.zeros(opts.batch, height, width, dtype=torch.bool, device=device)
    pad[1:, :, width - 8:] = True
    kwargs = {"key_padding_mask": pad.flatten(1), "need_weights": False, "hw": (height, width)}
    grad = torch.randn_like(x)
    autocast = torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)

    def train():
        with autocast:
            out = layer(x, x, x, **kwargs)[0]
        out.float().backward(grad)

    def infer():
        with torch.no_grad(), autocast:
            layer(x, x, x, **kwargs)
    results = {}
    with route(layer, path):
        layer.train()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        results["first"], results["train"] = timed(train, device, opts.repeats, opts.warmup)
        if device == "cuda":
            results["MiB"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        layer.eval()
        results["eval"] = timed(infer, device, opts.repeats, opts.warmup)[1]
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=("cpu", "cuda"))
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help="--enc_rpe2d strings, comma-separated ('' for no iRPE)")
    parser.add_argument("--map", default="25x38", help="token map HxW")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    opts = parser.parse_args(argv)
    opts.map = tuple(int(v) for v in opts.map.lower().split("x"))
    paths = ("plain", "sdpa", "flex") if opts.device == "cuda" else ("plain", "cpu_kernel")
    print(f"device {opts.device} ({torch.cuda.get_device_name() if opts.device == 'cuda' else ''})"
          f", torch {torch.__version__}, map {opts.map[0]}x{opts.map[1]}, batch {opts.batch}, "
          f"{opts.repeats} timed runs after {opts.warmup} warm-ups")
    header = f"{'setting':<26} {'dtype':<9}"
    for path in paths:
        header += f" {path + ' train':>12} {'eval':>7}"
        header += f" {'MiB':>6}" if opts.device == "cuda" else ""
    print(header + (f" {'flex first':>10}  USE_FLEX / faster" if opts.device == "cuda" else ""))
    for setting in opts.settings.split(","):
        for dtype in (torch.float32, torch.bfloat16):
            rows = {path: measure(setting, dtype, path, opts) for path in paths}
            line = f"{setting or '(no iRPE)':<26} {str(dtype)[6:]:<9}"
            for path in paths:
                line += f" {rows[path]['train']:>12.2f} {rows[path]['eval']:>7.2f}"
                line += f" {rows[path]['MiB']:>6.0f}" if opts.device == "cuda" else ""
            if opts.device == "cuda":
                config = parse_rpe_string(setting)
                mode = None if config is None else next(
                    c for c in (config.rpe_q, config.rpe_k, config.rpe_v) if c is not None).mode
                chosen = "flex" if flex_attention.USE_FLEX.get(mode, False) else "sdpa"
                faster = min(("sdpa", "flex"), key=lambda p: rows[p]["train"])
                line += f" {rows['flex']['first']:>10.0f}  {chosen} / {faster}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
