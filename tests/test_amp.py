"""Mixed precision: the autocast policy of the rpe_ops operators and --amp in main.py (toy runs
against float32, the float16 gradient scaler in checkpoints and on resume)."""
import json

import pytest
import torch

import main
import rpe_ops
from rpe_ops import _fallback
from tests.test_main import TINY, TOY, run_main
from util import amp
from util.checkpoint import load_checkpoint, save_atomic

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


# ----------------------------------------------------------------------------------------------
# rpe_ops under autocast: no cast, the input's dtype

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rpe_ops_run_in_their_input_dtype_under_autocast(device, dtype):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 40, 9, device=device).to(dtype)
    index = torch.randint(0, 9, (40, 50), device=device)
    grad = torch.randn(2, 3, 40, 50, device=device).to(dtype)
    with torch.autocast(device, torch.bfloat16):
        looked_up = rpe_ops.rpe_index(x, index)
        summed = rpe_ops.rpe_index_backward(grad, index, 9)
    assert looked_up.dtype == dtype and summed.dtype == dtype
    # outside autocast the fallback (gather / scatter_add) in the same dtype; the bucket sum of
    # bfloat16 accumulates in float32, so its reference is the float32 sum rounded once
    assert torch.equal(looked_up, _fallback.rpe_index(x, index))
    expected = _fallback.rpe_index_backward(grad.float(), index, 9).to(dtype)
    torch.testing.assert_close(summed, expected, rtol=0 if dtype == torch.float32 else 8e-3,
                               atol=1e-5 if dtype == torch.float32 else 0)


def test_rpe_ops_gradients_keep_the_dtype_under_autocast():
    x = torch.randn(2, 3, 40, 9, dtype=torch.bfloat16, requires_grad=True)
    index = torch.randint(0, 9, (40, 50))
    with torch.autocast("cpu", torch.bfloat16):
        out = rpe_ops.rpe_index(x, index)
    out.float().square().sum().backward()
    assert x.grad.dtype == torch.bfloat16
    expected = _fallback.rpe_index_backward(2 * out.float(), index, 9).to(torch.bfloat16)
    torch.testing.assert_close(x.grad, expected, rtol=8e-3, atol=0)


def test_rpe_ops_autocast_policy_is_registered_for_cpu_and_cuda():
    for op in ("rpe_index", "rpe_index_backward"):
        for key in ("AutocastCPU", "AutocastCUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"rpe_ops::{op}", key), (op, key)


# ----------------------------------------------------------------------------------------------
# --amp in main.py

def test_a_dtype_autocast_cannot_run_is_refused_in_one_line():
    with pytest.raises(ValueError) as err:
        amp.check_supported("cpu", torch.float64)
    message = str(err.value)
    assert message.startswith("--amp:") and "\n" not in message and "float64" in message


def train_losses(out):
    return [json.loads(line)["train_loss"] for line in (out / "log.txt").read_text().splitlines()]


@pytest.fixture(scope="module")
def float32_run(tmp_path_factory):
    """One epoch in float32: its log and checkpoint (a checkpoint without scaler state)."""
    root = tmp_path_factory.mktemp("amp")
    out = root / "fp32"
    run_main(*TOY, "--toy_path", root / "toy", *TINY, "--output_dir", out, "--epochs", 1,
             "--enc_rpe2d", "rpe-2.0-product-ctx-1-k", "--vis_images", 0)
    return root, out


def test_bfloat16_autocast_trains_with_a_loss_close_to_float32(float32_run, tmp_path):
    root, fp32 = float32_run
    out = tmp_path / "bf16"
    stats = run_main(*TOY, "--toy_path", root / "toy", *TINY, "--output_dir", out, "--epochs", 1,
                     "--enc_rpe2d", "rpe-2.0-product-ctx-1-k", "--vis_images", 0, "--amp")
    (reference,), (loss,) = train_losses(fp32), train_losses(out)
    assert torch.isfinite(torch.tensor(loss)) and torch.isfinite(torch.tensor(stats["loss"]))
    # the same data and initial weights: bfloat16 rounding moves the loss a little, not more
    assert loss != reference, "--amp changed nothing"
    assert abs(loss - reference) < 0.02 * abs(reference), (loss, reference)
    assert "scaler" not in load_checkpoint(out / "checkpoint.pth")  # bfloat16 needs no scaling


def test_float16_scaler_is_saved_and_restored_and_old_checkpoints_resume(float32_run, tmp_path):
    root, fp32 = float32_run
    out = tmp_path / "fp16"
    out.mkdir()
    common = [*TOY, "--toy_path", root / "toy", *TINY, "--output_dir", out, "--vis_images", 0,
              "--enc_rpe2d", "rpe-2.0-product-ctx-1-k", "--amp", "--amp_dtype", "float16"]
    # a checkpoint without scaler state (float32 training) resumes under float16
    run_main(*common, "--resume", fp32 / "checkpoint.pth", "--epochs", 2)
    checkpoint = load_checkpoint(out / "checkpoint.pth")
    assert checkpoint["epoch"] == 1 and torch.isfinite(torch.tensor(train_losses(out))).all()
    assert checkpoint["scaler"]["scale"] > 0
    # the scale continues from the checkpoint's: a fresh scaler would start at 65536 and only
    # halve on overflows; growth comes after 2000 clean steps
    checkpoint["scaler"]["scale"] = 128.0
    save_atomic(checkpoint, out / "checkpoint.pth")
    run_main(*common, "--resume", out / "checkpoint.pth", "--epochs", 3)
    resumed = load_checkpoint(out / "checkpoint.pth")
    assert resumed["epoch"] == 2 and resumed["scaler"]["scale"] <= 128.0
    assert resumed["scaler"]["_growth_tracker"] > 0


@CUDA
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_amp_toy_training_on_cuda_is_close_to_float32(tmp_path, dtype):
    common = [*TOY, "--toy_path", tmp_path / "toy", *TINY, "--device", "cuda", "--epochs", 1,
              "--enc_rpe2d", "rpe-2.0-product-ctx-1-k", "--vis_images", 0]
    run_main(*common, "--output_dir", tmp_path / "fp32")
    run_main(*common, "--output_dir", tmp_path / dtype, "--amp", "--amp_dtype", dtype)
    (reference,), (loss,) = train_losses(tmp_path / "fp32"), train_losses(tmp_path / dtype)
    assert abs(loss - reference) < 0.02 * abs(reference), (loss, reference)
    saved = load_checkpoint(tmp_path / dtype / "checkpoint.pth")
    assert ("scaler" in saved) == (dtype == "float16")


def test_amp_options_parse_with_bfloat16_by_default():
    args = main.get_args_parser().parse_args(["--amp"])
    assert args.amp and args.amp_dtype == "bfloat16"
    with pytest.raises(SystemExit):
        main.get_args_parser().parse_args(["--amp_dtype", "float64"])


# ----------------------------------------------------------------------------------------------
# What runs in bfloat16 under autocast

def float32_outputs(model, samples, device):
    """Modules of the backbone's ResNet and of the encoder's attention whose output is float32
    when `model` runs under bfloat16 autocast on `device`: (name, type) pairs."""
    found = []

    def hook(name):
        def record(module, inputs, output):
            output = output[0] if isinstance(output, tuple) else output
            if isinstance(output, torch.Tensor) and output.dtype == torch.float32:
                found.append((name, type(module).__name__))
        return record
    watched = [(f"backbone.{n}", m) for n, m in model.backbone[0].body.named_modules() if n]
    watched += [(n, m) for n, m in model.transformer.encoder.named_modules()
                if n.endswith(("self_attn", "rpe_k"))]
    handles = [m.register_forward_hook(hook(n)) for n, m in watched]
    try:
        amp.forward(model, samples, device, torch.bfloat16)
    finally:
        for handle in handles:
            handle.remove()
    return found


def tiny_detr(device):
    from models import build_model
    args = main.get_args_parser().parse_args(
        [*TINY, "--enc_rpe2d", "rpe-2.0-product-ctx-1-k", "--coco_path", "unused",
         "--device", device, "--num_classes", "91"])
    torch.manual_seed(0)
    return build_model(args)[0].to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_backbone_and_encoder_attention_stay_in_bfloat16_under_autocast(device):
    """No float32 activation between the input and the encoder's attention output: a float32
    module output there (frozen batch norm multiplying by its float32 buffers, say) is a full
    pass in float32 and a cast back at the next convolution."""
    import util.misc as utils
    model = tiny_detr(device).train()
    samples = utils.nested_tensor_from_tensor_list([torch.randn(3, 96, 128, device=device),
                                                    torch.randn(3, 80, 100, device=device)])
    assert float32_outputs(model, samples, device) == []
