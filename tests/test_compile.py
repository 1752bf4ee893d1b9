"""--compile: torch.compile(model) (inductor) against the eager model, eval outputs and a training
step's loss and gradients, and the one-line refusals where it cannot run."""
import pytest
import torch

from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.resnet import BasicBlock, ResNet

import main
import util.misc as utils
from models import build_model
from models.backbone import FrozenBatchNorm2d
from tests.test_main import TINY, TOY, run_main
from util import torch_compile

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TARGETS = [{"labels": torch.tensor([1, 3]),
            "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.6, 0.1, 0.2]])},
           {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.4, 0.4, 0.3, 0.3]])}]


def tiny(device, train_backbone=False):
    """TINY's model with one residual block per stage (less to compile), the backbone frozen
    unless `train_backbone` (its backward is torchvision's, and half of what compiles). Dropout
    off: the compiled graph draws its dropout masks from another generator."""
    args = main.get_args_parser().parse_args(
        [*TINY, "--enc_rpe2d", "rpe-2.0-product-ctx-1-k", "--dropout", "0", "--coco_path",
         "unused", "--device", device, "--num_classes", "91"])
    torch.manual_seed(0)
    model, criterion, _ = build_model(args)
    resnet = ResNet(BasicBlock, [1, 1, 1, 1], norm_layer=FrozenBatchNorm2d)
    for name, p in resnet.named_parameters():
        p.requires_grad_(train_backbone and name.startswith(("layer2", "layer3", "layer4")))
    model.backbone[0].body = IntermediateLayerGetter(resnet, return_layers={"layer4": "0"})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lookup_table" in name:
                p.normal_(0, 0.3)  # the tables start at zero: make the iRPE terms count
    return model.to(device), criterion.to(device)


def batch(sizes, device):
    torch.manual_seed(1)
    return utils.nested_tensor_from_tensor_list([torch.randn(3, h, w, device=device)
                                                 for h, w in sizes])


def training_step(model, run, criterion, samples):
    """Loss and every gradient of `model` in one step through `run` (the model or its compiled
    form): what main.py's training computes before AdamW."""
    for p in model.parameters():
        p.grad = None
    outputs = run(samples)
    targets = [{k: v.to(samples.tensors.device) for k, v in t.items()} for t in TARGETS]
    losses = criterion(outputs, targets)
    loss = sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def assert_relative(a, b, rtol):
    scale = b.abs().max().clamp(min=1e-30)
    assert ((a - b).abs().max() / scale).item() <= rtol


def compare(device, sizes_list, rtol, train_backbone=False):
    model, criterion = tiny(device, train_backbone)
    compiled = torch.compile(model)
    model.eval()
    for sizes in sizes_list:
        with torch.no_grad():
            expected, got = model(batch(sizes, device)), compiled(batch(sizes, device))
        for key in ("pred_logits", "pred_boxes"):
            assert_relative(got[key], expected[key], rtol)
    model.train()
    for sizes in sizes_list:
        loss, grads = training_step(model, model, criterion, batch(sizes, device))
        compiled_loss, compiled_grads = training_step(model, compiled, criterion,
                                                      batch(sizes, device))
        assert_relative(compiled_loss, loss, rtol)
        assert set(compiled_grads) == set(grads)
        for name in grads:
            assert_relative(compiled_grads[name], grads[name], rtol)


def test_compiled_model_equals_eager_in_eval_and_in_a_training_step():
    """One image size (two compilations: eval, training), the backbone frozen."""
    compare("cpu", [[(64, 96), (80, 64)]], 2e-5)


@CUDA
def test_compiled_model_equals_eager_on_cuda_at_changing_sizes():
    """Three sizes, as multi-scale training meets them (dynamic shapes from the second on)."""
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # full fp32
    try:
        compare("cuda", [[(64, 96), (80, 64)], [(96, 64), (64, 64)], [(72, 100), (64, 70)]], 1e-4,
                train_backbone=True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


@pytest.mark.parametrize("missing", ["dynamo", "cxx"])
def test_compile_is_refused_in_one_line_where_it_cannot_run(missing, monkeypatch, tmp_path):
    if missing == "dynamo":
        monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    else:
        monkeypatch.delenv("CXX", raising=False)
        monkeypatch.setattr(torch_compile.shutil, "which", lambda name: None)
    with pytest.raises(SystemExit) as stop:
        run_main(*TOY, "--toy_path", tmp_path / "toy", *TINY, "--output_dir", tmp_path / "out",
                 "--compile")
    message = str(stop.value)
    assert message.startswith("error: --compile") and "\n" not in message
    assert "without --compile" in message
    assert not (tmp_path / "toy").exists(), "the refusal came after work was done"


def test_compile_option_parses():
    assert main.get_args_parser().parse_args(["--compile"]).compile
    assert not main.get_args_parser().parse_args([]).compile
