"""main.py end to end on CPU: training, evaluation, checkpoints, resume, distributed, messages."""
import argparse
import functools
import http.server
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import threading

import pytest
import torch

import main
from tests.conftest import ROOT
from tests.mini_coco import write_mini_coco
from util.checkpoint import CheckpointError, load_checkpoint, save_atomic

# a model small enough for CPU tests; everything else at DETR's defaults
TINY = ["--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "32", "--nheads", "2",
        "--dim_feedforward", "64", "--enc_layers", "1", "--dec_layers", "2", "--num_queries", "6",
        "--device", "cpu", "--num_workers", "0", "--print_freq", "1"]
TOY = ["--dataset_file", "toy", "--toy_num_train", "6", "--toy_num_val", "4"]


def run_main(*argv):
    return main.run([str(a) for a in argv])


def run_cli(*argv, env=None, timeout=600):
    """main.py in a fresh process; returns the CompletedProcess."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=full_env)


@pytest.fixture(scope="module")
def mini_coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    write_mini_coco(str(root / "folder"), layout="folder", num_random=0)
    write_mini_coco(str(root / "zip"), layout="zip", num_random=0)
    return root


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    return tmp_path_factory.mktemp("toy") / "toy_data"


# ----------------------------------------------------------------------------------------------
# COCO layout: train, evaluate, evaluate a published-format checkpoint

def test_train_and_evaluate_on_mini_coco_folders_then_zips(mini_coco, tmp_path):
    out = tmp_path / "out"
    stats = run_main("--coco_path", mini_coco / "folder", "--output_dir", out, "--epochs", 1,
                     "--enc_rpe2d", "rpe-2.0-product-ctx-1-k", *TINY)
    assert len(stats["coco_eval_bbox"]) == 12
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert len(log) == 1 and log[0]["epoch"] == 0
    assert {"train_loss", "test_loss", "test_coco_eval_bbox", "n_parameters"} <= set(log[0])
    checkpoint = load_checkpoint(out / "checkpoint.pth")
    assert {"model", "optimizer", "lr_scheduler", "epoch", "args"} <= set(checkpoint)
    assert isinstance(checkpoint["args"], argparse.Namespace)
    assert checkpoint["args"].enc_rpe2d == "rpe-2.0-product-ctx-1-k"

    # the same checkpoint evaluated on the zip layout gives the same numbers
    out_zip = tmp_path / "out_zip"
    zip_stats = run_main("--coco_path", mini_coco / "zip", "--output_dir", out_zip, "--eval",
                         "--resume", out / "checkpoint.pth", "--enc_rpe2d", "rpe-2.0-product-ctx-1-k",
                         *TINY)
    folder_stats = run_main("--coco_path", mini_coco / "folder", "--output_dir", tmp_path / "o3",
                            "--eval", "--resume", out / "checkpoint.pth", "--enc_rpe2d",
                            "rpe-2.0-product-ctx-1-k", *TINY)
    assert zip_stats["coco_eval_bbox"] == folder_stats["coco_eval_bbox"]
    assert zip_stats["loss"] == folder_stats["loss"]
    eval_file = torch.load(out_zip / "eval.pth", weights_only=False)
    assert {"precision", "recall", "params"} <= set(eval_file)


def _published_style_checkpoint(path, setting, with_args=True, only_model=False):
    """A checkpoint as the published training wrote it: pickled argparse.Namespace included."""
    args = main.get_args_parser().parse_args(["--enc_rpe2d", setting, *TINY, "--num_classes", "91"])
    from models import build_model
    model, _, _ = build_model(args)
    if only_model:
        content = {"model": model.state_dict()}
    else:
        optimizer = torch.optim.AdamW(model.parameters())
        content = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                   "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 200).state_dict(),
                   "epoch": 149}
        if with_args:
            content["args"] = args
    torch.save(content, path)  # plain pickle, as the published code did
    return model


def test_eval_resume_of_a_checkpoint_with_namespace_writes_eval_pth(mini_coco, tmp_path):
    ckpt = tmp_path / "rpe-2.0-product-ctx-1-k.pth"
    _published_style_checkpoint(ckpt, "rpe-2.0-product-ctx-1-k")
    proc = run_cli("main.py", "--coco_path", mini_coco / "folder", "--output_dir", tmp_path / "out",
                   "--eval", "--resume", ckpt, "--enc_rpe2d", "rpe-2.0-product-ctx-1-k", *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out" / "eval.pth").is_file()
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in proc.stdout


def test_eval_of_a_model_only_checkpoint(mini_coco, tmp_path):
    ckpt = tmp_path / "model_only.pth"
    _published_style_checkpoint(ckpt, "", only_model=True)
    run_main("--coco_path", mini_coco / "folder", "--output_dir", tmp_path / "out", "--eval",
             "--resume", ckpt, *TINY)
    assert (tmp_path / "out" / "eval.pth").is_file()


# ----------------------------------------------------------------------------------------------
# Messages

def test_checkpoint_of_another_configuration_is_named(mini_coco, tmp_path):
    ckpt = tmp_path / "rpe-1.9.pth"
    _published_style_checkpoint(ckpt, "rpe-1.9-product-ctx-1-k")
    proc = run_cli("main.py", "--coco_path", mini_coco / "folder", "--eval", "--resume", ckpt,
                   "--enc_rpe2d", "rpe-2.0-product-ctx-1-k", *TINY)
    assert proc.returncode != 0
    assert "this file was trained with --enc_rpe2d rpe-1.9-product-ctx-1-k" in proc.stderr
    assert "Traceback" not in proc.stderr and "size mismatch" not in proc.stderr


def test_bare_state_dict_of_another_configuration_is_described(tmp_path):
    ckpt = tmp_path / "bare.pth"
    model = _published_style_checkpoint(ckpt, "rpe-1.9-product-ctx-1-k", only_model=True)
    torch.save(model.state_dict(), ckpt)
    args = main.get_args_parser().parse_args(["--enc_rpe2d", "", *TINY, "--num_classes", "91"])
    from models import build_model
    from util.checkpoint import check_compatible
    other, _, _ = build_model(args)
    with pytest.raises(CheckpointError) as err:
        check_compatible(other, load_checkpoint(ckpt), args)
    message = str(err.value)
    assert "iRPE tables of 49 buckets, mode ctx, shared_head 1, on k" in message
    # 49 buckets fit a product table for every ratio in [1.5, 2) (and euc / quant tables at
    # ratio 12): no single ratio is suggested, the model zoo's is named
    assert "rpe-{ratio}-product-ctx-1-k with ratio in [1.5, 2)" in message
    assert "rpe-{ratio}-euc-ctx-1-k with ratio in [12, 12.5)" in message
    assert "the model zoo's is --enc_rpe2d rpe-1.9-product-ctx-1-k" in message
    assert "rpe-1.5-" not in message


def test_model_only_file_that_fits_warns_that_its_ratio_is_unchecked(tmp_path, caplog):
    # ratios 1.5 and 1.9 give tables of the same shapes but other bucket ids: the file loads
    # strictly either way, so the run says which setting it assumes
    from models.rpe_attention.irpe import bucket_ids
    assert not torch.equal(bucket_ids("product", 1.5, 9, 9), bucket_ids("product", 1.9, 9, 9))
    ckpt = tmp_path / "bare.pth"
    model = _published_style_checkpoint(ckpt, "rpe-1.9-product-ctx-1-k", only_model=True)
    from util.checkpoint import check_compatible
    args = main.get_args_parser().parse_args(["--enc_rpe2d", "rpe-1.5-product-ctx-1-k", *TINY])
    with caplog.at_level("WARNING"):
        check_compatible(model, load_checkpoint(ckpt), args, name=str(ckpt))
    assert "does not record its options: make sure --enc_rpe2d rpe-1.5-product-ctx-1-k" in caplog.text
    assert "rpe-1.9-product-ctx-1-k" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):  # a file with its options is checked, not warned about
        check_compatible(model, {"model": model.state_dict(), "args": args}, args)
    assert caplog.text == ""


@pytest.mark.parametrize("method, buckets, expected", [
    ("euc", 9, ["euc-bias-0-k with ratio in [2, 2.5)", "quant-bias-0-k with ratio in [2, 2.5)",
                "product-bias-0-k with ratio in [0.5, 1)"]),
    ("quant", 7, ["euc-bias-0-k with ratio in [1.5, 2)", "quant-bias-0-k with ratio in [1.5, 2)"]),
    ("cross", 5, ["cross-bias-0-k with ratio in [1, 1.5)"]),
])
def test_table_description_names_every_setting_that_fits(method, buckets, expected):
    from models.rpe_attention.irpe import num_buckets_of
    from util.checkpoint import describe_checkpoint
    ratio = {9: 2.0, 7: 1.5, 5: 1.0}[buckets]
    assert num_buckets_of(method, ratio) == buckets
    prefix = "transformer.encoder.layers.0.self_attn.rpe_k."
    keys = [prefix + "rp_rows.", prefix + "rp_cols."] if method == "cross" else [prefix]
    text = describe_checkpoint({k + "lookup_table_bias": torch.zeros(2, buckets) for k in keys})["enc_rpe2d"]
    for part in expected:
        assert part in text
    assert text.count("with ratio in") == len(expected)
    assert "model zoo" not in text


def test_missing_data_message(tmp_path):
    proc = run_cli("main.py", "--coco_path", tmp_path / "nowhere", *TINY)
    assert proc.returncode != 0
    assert str(tmp_path / "nowhere") in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("main.py", *TINY)  # no --coco_path at all
    assert proc.returncode != 0 and "--coco_path" in proc.stderr and "Traceback" not in proc.stderr


def test_unreadable_checkpoint_message(tmp_path):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="could not read checkpoint"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "absent.pth")


def test_checkpoint_loading_refuses_arbitrary_objects(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo unsafe",))

    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "payload": Payload()}, path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


# ----------------------------------------------------------------------------------------------
# Checkpoint files

def test_atomic_save_keeps_the_previous_file_when_saving_fails(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    save_atomic({"model": {"w": torch.ones(3)}}, path)
    before = path.read_bytes()
    real_save = torch.save

    def crash(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        raise KeyboardInterrupt  # killed half-way: the bytes are there, the rename is not

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_atomic({"model": {"w": torch.zeros(1000)}}, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["checkpoint.pth"]


def test_resume_from_an_http_url_is_downloaded_once(tmp_path, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    save_atomic({"model": {"w": torch.arange(4.0)}}, served / "zoo.pth")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "cache"))
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/zoo.pth"
        assert torch.equal(load_checkpoint(url)["model"]["w"], torch.arange(4.0))
    finally:
        server.shutdown()
        server.server_close()
    # cached: works with the server gone
    assert torch.equal(load_checkpoint(url)["model"]["w"], torch.arange(4.0))
    with pytest.raises(CheckpointError, match="could not download"):
        load_checkpoint(f"http://127.0.0.1:{server.server_address[1]}/other.pth")


# ----------------------------------------------------------------------------------------------
# Toy data: exact resume, non-finite loss, distributed

def test_resume_is_exact(toy_root, tmp_path):
    common = [*TOY, "--toy_path", toy_root, *TINY, "--num_workers", "1", "--lr_drop", "1",
              "--enc_rpe2d", "rpe-2.0-product-ctx-1-k", "--batch_size", "2", "--lr_backbone", "1e-5"]
    run_main(*common, "--output_dir", tmp_path / "straight", "--epochs", 2)
    run_main(*common, "--output_dir", tmp_path / "split", "--epochs", 1)
    run_main(*common, "--output_dir", tmp_path / "split", "--epochs", 2,
             "--resume", tmp_path / "split" / "checkpoint.pth")
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pth")
    b = load_checkpoint(tmp_path / "split" / "checkpoint.pth")
    assert a["epoch"] == b["epoch"] == 1
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["lr_scheduler"] == b["lr_scheduler"]
    # lr_drop 1: the periodic copies before each drop
    assert (tmp_path / "straight" / "checkpoint0000.pth").is_file()
    assert (tmp_path / "straight" / "checkpoint0001.pth").is_file()


def readme_toy_command():
    """The README's first quick-start command, as an argument list without 'python'."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    start = text.index("python main.py --dataset_file toy")
    end = start
    while text[end:text.index("\n", end)].rstrip().endswith("\\"):
        end = text.index("\n", end) + 1
    command = text[start:text.index("\n", end)].replace("\\\n", " ")
    return shlex.split(command)[1:]


def makefile_demo_args():
    """The Makefile's DEMO_ARGS (continuation lines joined, $(DEMO_OUT) filled in), as a list."""
    with open(os.path.join(ROOT, "Makefile")) as f:
        text = f.read().replace("\\\n", " ")
    variables = dict(re.findall(r"^(\w+)\s*\??=\s*(.*)$", text, flags=re.MULTILINE))
    return shlex.split(re.sub(r"\$\((\w+)\)", lambda m: variables[m.group(1)], variables["DEMO_ARGS"]))


def test_readme_toy_command_runs(tmp_path):
    # the README's command as written, shrunk by options given after it (argparse keeps the last)
    argv = readme_toy_command()
    assert argv[0] == "main.py" and "--epochs" in argv and "--enc_rpe2d" in argv
    assert makefile_demo_args() == argv[1:], "README's demo command and the Makefile's DEMO_ARGS differ"
    out = tmp_path / "out"
    proc = run_cli(*argv, "--output_dir", out, "--toy_path", tmp_path / "toy", "--toy_num_train", 4,
                   "--toy_num_val", 2, "--epochs", 1, "--batch_size", 2, "--device", "cpu",
                   "--num_workers", 0)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Average Precision  (AP) @[ IoU=0.50 " in proc.stdout + proc.stderr
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [entry["epoch"] for entry in log] == [0]
    assert (out / "checkpoint.pth").is_file()


def test_non_finite_loss_stops_and_keeps_the_checkpoint(toy_root, tmp_path, monkeypatch):
    out = tmp_path / "out"
    common = [*TOY, "--toy_path", toy_root, *TINY, "--output_dir", out]
    run_main(*common, "--epochs", 1)
    before = (out / "checkpoint.pth").read_bytes()

    from models.detr import SetCriterion
    real = SetCriterion.loss_boxes

    def nan_boxes(self, *args, **kwargs):
        return {k: v * float("nan") for k, v in real(self, *args, **kwargs).items()}

    monkeypatch.setattr(SetCriterion, "loss_boxes", nan_boxes)
    with pytest.raises(SystemExit) as err:
        run_main(*common, "--epochs", 2, "--resume", out / "checkpoint.pth")
    assert "the loss is nan at epoch 1" in str(err.value)
    assert (out / "checkpoint.pth").read_bytes() == before


@pytest.mark.parametrize("launcher", ["launch --use_env", "launch", "torchrun"])
def test_two_process_gloo_run_writes_one_log(toy_root, tmp_path, launcher):
    out = tmp_path / "out"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # without --use_env, torch.distributed.launch passes --local-rank=N to the script
    launch = {"launch --use_env": ["torch.distributed.launch", "--use_env"],
              "launch": ["torch.distributed.launch"], "torchrun": ["torch.distributed.run"]}
    proc = run_cli("-m", *launch[launcher], "--nproc_per_node=2", f"--master_port={port}", "main.py",
                   *TOY, "--toy_path", toy_root, *TINY, "--output_dir", out, "--epochs", 1,
                   "--enc_rpe2d", "rpe-1.9-product-ctx-1-k", env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (out / "log.txt").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["epoch"] == 0
    assert (out / "checkpoint.pth").is_file()
    assert len(load_checkpoint(out / "checkpoint.pth")["rng_states"]) == 2
    assert proc.stdout.count("start training") == 1  # only the main process logs


# ----------------------------------------------------------------------------------------------
# Launcher variables

def test_local_rank_argument_both_spellings():
    parser = main.get_args_parser()
    assert parser.parse_args(["--local_rank", "3"]).local_rank == 3
    assert parser.parse_args(["--local-rank=2"]).local_rank == 2


def test_distributed_env_reads_launchers(monkeypatch):
    from util.misc import distributed_env
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(var, raising=False)
    assert distributed_env() is None
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert distributed_env() == (5, 8, 1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert distributed_env(local_rank_arg=1) == (3, 4, 1)  # launch without --use_env
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert distributed_env(local_rank_arg=1) == (3, 4, 0)
