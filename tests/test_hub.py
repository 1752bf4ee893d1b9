"""hubconf.py: every entry point builds the model-zoo architecture offline, and pretrained=True
reads the published file from torch's hub cache without network, or says what to do."""
import argparse
import urllib.error
import urllib.request

import pytest
import torch

import hubconf
from models.detr import PostProcess

from tests.conftest import ROOT, load_reference

# entry point -> (state_dict schema of tests/data, published file name)
ENTRIES = {
    "detr_resnet50": ("no-rpe", "detr-r50-e632da11.pth"),
    "detr_resnet50_rpe_1_9_product_ctx_1_k": ("rpe-1.9-product-ctx-1-k", "rpe-1.9-product-ctx-1-k.pth"),
    "detr_resnet50_rpe_2_0_product_ctx_1_k": ("rpe-2.0-product-ctx-1-k", "rpe-2.0-product-ctx-1-k.pth"),
    "detr_resnet50_rpe_2_0_product_ctx_1_k_300ep": ("rpe-2.0-product-ctx-1-k",
                                                    "rpe-2.0-product-ctx-1-k_300epochs.pth"),
}


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network, and an empty torch hub cache under tmp_path/hub."""
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network disabled by the test")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    return tmp_path / "hub" / "checkpoints"


def test_every_entry_point_builds_the_model_zoo_architecture_offline(offline):
    # torch.hub's rule for entry points (torch.hub.list reads only GitHub)
    assert {n for n in dir(hubconf) if callable(getattr(hubconf, n)) and not n.startswith("_")} == set(ENTRIES)
    for name, (schema_name, _) in ENTRIES.items():
        model, postprocessor = torch.hub.load(ROOT, name, source="local", pretrained=False,
                                              return_postprocessor=True)
        got = [[k, list(v.shape), str(v.dtype).replace("torch.", "")]
               for k, v in model.state_dict().items()]
        assert got == load_reference("state_dict_schema.json")[schema_name], name
        assert isinstance(postprocessor, PostProcess)
        assert not model.aux_loss and model.num_queries == 100


def test_pretrained_reads_the_hub_cache_without_network(offline):
    reference = hubconf.detr_resnet50_rpe_1_9_product_ctx_1_k()
    torch.manual_seed(3)
    state_dict = {k: torch.randn(v.shape) if v.is_floating_point() else v
                  for k, v in reference.state_dict().items()}
    offline.mkdir(parents=True)
    # as the published files: the model beside the training state and the pickled options
    torch.save({"model": state_dict, "epoch": 149, "args": argparse.Namespace(lr=1e-4)},
               offline / "rpe-1.9-product-ctx-1-k.pth")
    model = hubconf.detr_resnet50_rpe_1_9_product_ctx_1_k(pretrained=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state_dict[key]), key


def test_pretrained_without_cache_or_network_says_what_to_do(offline):
    with pytest.raises(RuntimeError) as err:
        hubconf.detr_resnet50_rpe_2_0_product_ctx_1_k_300ep(pretrained=True)
    message = str(err.value)
    assert ("https://github.com/wkcn/iRPE-model-zoo/releases/download/1.0/"
            "rpe-2.0-product-ctx-1-k_300epochs.pth") in message
    assert str(offline / "rpe-2.0-product-ctx-1-k_300epochs.pth") in message
    assert "network disabled by the test" in message and "pretrained=False" in message
    with pytest.raises(ValueError, match="num_classes=91"):
        hubconf.detr_resnet50(pretrained=True, num_classes=20)
