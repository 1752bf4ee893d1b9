"""torch.export and ONNX: the detector with iRPE exports with a dynamic image size, and the exported
program and the ONNX file (run by onnxruntime) give the eager numbers at other sizes too."""
import importlib.util

import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from models.backbone import BackboneBase, FrozenBatchNorm2d, Joiner
from models.detr import DETR
from models.position_encoding import PositionEmbeddingSine
from models.rpe_attention import RPEMultiheadAttention, parse_rpe_string
from models.transformer import Transformer
from util.misc import nested_tensor_from_tensor_list

ONNX_PACKAGES = ("onnx", "onnxruntime", "onnxscript")
_missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
needs_onnx = pytest.mark.skipif(bool(_missing), reason=f"{', '.join(_missing)} not installed "
                                                       f"(pip install -r requirements-test.txt)")

# exported with the first batch; the others have other sizes and padding (the batch size is fixed)
BATCHES = [((96, 160), (128, 120)), ((200, 130), (160, 150)), ((64, 64), (70, 64))]


def batch(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return nested_tensor_from_tensor_list([torch.rand(3, h, w, generator=g) for h, w in sizes])


def tiny_detr(enc_rpe2d):
    """DETR assembled from its parts; the backbone a torchvision ResNet of one block per stage
    (ResNet-18 has two), which halves the time of an export and leaves every kind of layer."""
    torch.manual_seed(0)
    resnet = ResNet(BasicBlock, [1, 1, 1, 1], norm_layer=FrozenBatchNorm2d)
    with torch.no_grad():  # frozen batch norm statistics of a trained network, not the identity
        for m in resnet.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.bias.normal_(0, 0.1)
    backbone = Joiner(BackboneBase(resnet, False, 512, False), PositionEmbeddingSine(16, normalize=True))
    transformer = Transformer(d_model=32, nhead=4, num_encoder_layers=1, num_decoder_layers=1,
                              dim_feedforward=64, return_intermediate_dec=True, rpe_config=enc_rpe2d)
    return DETR(backbone, transformer, num_classes=3, num_queries=5).eval()


@pytest.fixture(scope="module")
def exported():
    """(eager model, ExportedProgram) with height and width dynamic; rpe_index on q and k, its
    transpose on v."""
    model = tiny_detr("rpe-2.0-product-ctx-1-qkv")
    height = torch.export.Dim("height", min=64, max=1344)
    width = torch.export.Dim("width", min=64, max=1344)
    # a NestedTensor input is the pair (images (B, 3, H, W), mask (B, H, W))
    dynamic_shapes = ([{2: height, 3: width}, {1: height, 2: width}],)
    return model, torch.export.export(model, (batch(BATCHES[0]),), dynamic_shapes=dynamic_shapes)


def test_exported_program_equals_eager_at_other_sizes(exported, tmp_path):
    model, program = exported
    # standard ops only: the rpe_ops operators were written as gather / scatter_add
    assert "rpe_ops" not in str(program.graph)
    torch.export.save(program, tmp_path / "detr.pt2")
    loaded = torch.export.load(tmp_path / "detr.pt2").module()
    for i, sizes in enumerate(BATCHES):
        samples = batch(sizes, seed=i)
        expected = model(samples)
        got = loaded(samples)
        for key in ("pred_logits", "pred_boxes"):
            torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-5, msg=f"{sizes} {key}")


@needs_onnx
def test_onnx_in_onnxruntime_equals_eager_at_other_sizes(exported, tmp_path):
    import onnx
    import onnxruntime

    model, program = exported
    path = tmp_path / "detr.onnx"
    torch.onnx.export(program, dynamo=True, opset_version=18, input_names=["images", "mask"],
                      output_names=["pred_logits", "pred_boxes"]).save(str(path))
    onnx.checker.check_model(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for i, sizes in enumerate(BATCHES):
        samples = batch(sizes, seed=i)
        expected = model(samples)
        logits, boxes = session.run(None, {"images": samples.tensors.numpy(),
                                           "mask": samples.mask.numpy()})
        torch.testing.assert_close(torch.from_numpy(logits), expected["pred_logits"], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(torch.from_numpy(boxes), expected["pred_boxes"], rtol=1e-4, atol=1e-4)


class _Encoders(nn.Module):
    """Self-attention over a feature map with the other methods and modes, summed."""

    SETTINGS = ("rpe-2.0-euc-bias-0-qk", "rpe-1.9-quant-ctx-1-qkv", "rpe-2.5-cross-ctx-0-qkv",
                "rpe-3.0-cross-bias-1-q")

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.layers = nn.ModuleList(RPEMultiheadAttention(8, 2, rpe_config=parse_rpe_string(s))
                                    for s in self.SETTINGS)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if "lookup_table" in name:
                    p.normal_()

    def forward(self, x):
        _, _, height, width = x.shape
        tokens = x.flatten(2).permute(2, 0, 1)
        return sum(layer(tokens, tokens, tokens, hw=(height, width))[0] for layer in self.layers)


@needs_onnx
def test_every_method_and_mode_exports_to_onnx(tmp_path):
    import onnxruntime

    module = _Encoders().eval()
    height, width = torch.export.Dim("height", min=2, max=64), torch.export.Dim("width", min=2, max=64)
    path = tmp_path / "encoders.onnx"
    torch.onnx.export(module, (torch.randn(2, 8, 3, 5),), dynamo=True, opset_version=18,
                      dynamic_shapes=({2: height, 3: width},), input_names=["x"]).save(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for h, w in [(3, 5), (7, 4), (12, 13)]:
        x = torch.randn(2, 8, h, w)
        (got,) = session.run(None, {"x": x.numpy()})
        torch.testing.assert_close(torch.from_numpy(got), module(x), rtol=1e-4, atol=1e-4, msg=f"{h}x{w}")
