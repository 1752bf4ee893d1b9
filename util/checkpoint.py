"""Checkpoints: safe loading, atomic saving, random states, messages for one that does not fit."""
import argparse
import contextlib
import logging
import math
import os
import random
import re
import shutil
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import torch

from util.interrupt import signals_deferred

logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint could not be read, or does not fit the model."""


def _is_url(path):
    return urllib.parse.urlparse(str(path)).scheme in ("http", "https")


def cached_download(url):
    """Download `url` into torch's hub cache once; returns the local file's path."""
    name = os.path.basename(urllib.parse.urlparse(url).path) or "checkpoint.pth"
    path = os.path.join(torch.hub.get_dir(), "checkpoints", name)
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
                shutil.copyfileobj(response, f)
            os.replace(tmp, path)
        except (urllib.error.URLError, OSError) as err:
            raise CheckpointError(f"could not download {url} ({err}); without network, download it "
                                  f"elsewhere and pass its path to --resume, or place it at "
                                  f"{path}") from err
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return path


def load_checkpoint(path_or_url):
    """Load a checkpoint (path or http(s) URL) safely as a dict with at least 'model'."""
    path = cached_download(path_or_url) if _is_url(path_or_url) else str(path_or_url)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 -- every failure here means the same to the user
        raise CheckpointError(f"could not read checkpoint {path}: {err}") from err
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    if "model" not in checkpoint:
        if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            checkpoint = {"model": checkpoint}
        else:
            raise CheckpointError(f"{path} has no 'model' entry (keys: {sorted(checkpoint)[:10]})")
    return checkpoint


def save_atomic(obj, path, *args, **kwargs):
    """torch.save(obj, ...) to a temporary file renamed over `path`, stop signals held back."""
    path = str(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with signals_deferred():
            with open(tmp, "wb") as f:
                torch.save(obj, f, *args, **kwargs)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _to_bytes(state):
    return state.numpy().tobytes()


def _from_bytes(data):
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def get_rng_states(*generators):
    """The random states of torch, CUDA, numpy, python and `generators`, in plain Python values."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "torch": _to_bytes(torch.get_rng_state()),
        "cuda": [_to_bytes(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "numpy": (name, keys.tolist(), int(pos), int(has_gauss), float(cached_gaussian)),
        "python": random.getstate(),
        "generators": [_to_bytes(g.get_state()) for g in generators],
    }


def set_rng_states(states, *generators):
    """Restore what get_rng_states returned (the same generators, in the same order)."""
    torch.set_rng_state(_from_bytes(states["torch"]))
    if states["cuda"] and torch.cuda.is_available():
        # a process may see fewer GPUs than the one that saved: restore those it has
        visible = torch.cuda.device_count()
        if len(states["cuda"]) > visible:
            logger.info("the checkpoint holds the random states of %d GPUs, this process sees %d: "
                        "the first %d are restored", len(states["cuda"]), visible, visible)
        for device, state in enumerate(states["cuda"][:visible]):
            torch.cuda.set_rng_state(_from_bytes(state), device)
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    for g, state in zip(generators, states["generators"]):
        g.set_state(_from_bytes(state))


@contextlib.contextmanager
def rng_states_kept(*generators):
    """Every random state of get_rng_states(*generators) is back as before once the block ends."""
    states = get_rng_states(*generators)
    try:
        yield
    finally:
        set_rng_states(states, *generators)


# The model zoo's settings (SPEC.md), named when a file's tables fit one of them.
MODEL_ZOO_RPE = ("rpe-1.9-product-ctx-1-k", "rpe-2.0-product-ctx-1-k")


def _rpe_description(state_dict):
    """The encoder iRPE tables of a state_dict in --enc_rpe2d terms: every setting that fits (the
    shapes tell neither the ratio within an int(2 * ratio) nor euc from quant), the zoo's first."""
    tables = {k: v for k, v in state_dict.items()
              if k.startswith("transformer.encoder.layers.0.self_attn.rpe_")}
    if not tables:
        return "no iRPE (--enc_rpe2d '')"
    on = "".join(x for x in "qkv" if any(f".rpe_{x}." in k for k in tables))
    mode = "bias" if any(k.endswith("lookup_table_bias") for k in tables) else "ctx"
    cross = any(".rp_rows." in k for k in tables)
    qk_tables = [v for k, v in tables.items() if ".rpe_v." not in k]
    # q/k tables end with the buckets; v tables are (heads, buckets, head_dim)
    table = qk_tables[0] if qk_tables else next(iter(tables.values()))
    buckets = table.shape[-1] if qk_tables else table.shape[1]
    shared = "1" if table.shape[0] == 1 else "0"
    side = math.isqrt(buckets)
    candidates = []  # (method, beta_int): every setting whose tables have these shapes
    if cross:
        candidates.append(("cross", (buckets - 1) // 2))
    else:
        if side * side == buckets and side % 2 == 1 and side > 1:
            candidates.append(("product", (side - 1) // 2))
        if buckets % 2 == 1 and buckets > 1:
            candidates += [("euc", (buckets - 1) // 2), ("quant", (buckets - 1) // 2)]
    # the ratios r of int(2 * r) = beta_int, which the table sizes do not tell apart
    fits = [f"rpe-{{ratio}}-{method}-{mode}-{shared}-{on} with ratio in "
            f"[{beta_int / 2:g}, {(beta_int + 1) / 2:g})" for method, beta_int in candidates]
    zoo = [s for s in MODEL_ZOO_RPE if any(
        s.split("-")[2:] == [method, mode, shared, on] and int(2 * float(s.split("-")[1])) == b
        for method, b in candidates)]
    text = f"iRPE tables of {buckets} buckets, mode {mode}, shared_head {shared}, on {on}: "
    if not fits:
        return text + "no --enc_rpe2d setting has tables of these shapes"
    text += "the file does not record the ratio" + (" (or the method)" if len(fits) > 1 else "")
    text += "; any of " + " or ".join(fits) + " gives these shapes"
    if zoo:
        text += f"; the model zoo's is --enc_rpe2d {zoo[0]}"
    return text


def describe_checkpoint(state_dict):
    """The options a DETR state_dict implies, as {option: value} read off its tensors."""
    def count(prefix):
        indices = {int(m.group(1)) for k in state_dict for m in [re.match(prefix + r"(\d+)\.", k)] if m}
        return len(indices)

    found = {}
    if "query_embed.weight" in state_dict:
        found["num_queries"], found["hidden_dim"] = tuple(state_dict["query_embed.weight"].shape)
    if "class_embed.weight" in state_dict:
        found["num_classes"] = state_dict["class_embed.weight"].shape[0] - 1
    found["enc_layers"] = count(r"transformer\.encoder\.layers\.")
    found["dec_layers"] = count(r"transformer\.decoder\.layers\.")
    key = "transformer.encoder.layers.0.linear1.weight"
    if key in state_dict:
        found["dim_feedforward"] = state_dict[key].shape[0]
    blocks = count(r"backbone\.0\.body\.layer3\.")
    bottleneck = "backbone.0.body.layer1.0.conv3.weight" in state_dict
    found["backbone"] = {(2, False): "resnet18", (6, False): "resnet34", (6, True): "resnet50",
                         (23, True): "resnet101"}.get((blocks, bottleneck), "unknown")
    found["position_embedding"] = "learned" if "backbone.1.row_embed.weight" in state_dict else "sine"
    found["pre_norm"] = "transformer.encoder.norm.weight" in state_dict
    found["enc_rpe2d"] = _rpe_description(state_dict)
    return found


def _rpe_string(args):
    value = getattr(args, "enc_rpe2d", None) if isinstance(args, argparse.Namespace) else None
    return None if value is None else (value or "''")


def check_compatible(model, checkpoint, args=None, name="the checkpoint"):
    """Raise CheckpointError naming what the file holds when its tensors do not fit `model`."""
    state_dict, expected = checkpoint["model"], model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [k for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    if not (missing or unexpected or mismatched):
        if _rpe_string(checkpoint.get("args")) is None and any(".self_attn.rpe_" in k for k in state_dict):
            logger.warning("%s does not record its options: make sure --enc_rpe2d %s is the setting "
                           "it was trained with, since other ratios fit the same tables with other "
                           "bucket ids (%s)", name, _rpe_string(args) or "(as given)",
                           _rpe_description(state_dict))
        return
    theirs, ours = describe_checkpoint(state_dict), describe_checkpoint(expected)
    their_rpe, our_rpe = _rpe_string(checkpoint.get("args")), _rpe_string(args)
    if their_rpe is not None and our_rpe is not None:
        theirs["enc_rpe2d"], ours["enc_rpe2d"] = their_rpe, our_rpe
    differences = [f"--{k} {theirs[k]} (this run: {ours[k]})" for k in theirs if theirs[k] != ours[k]]
    detail = ", ".join(differences) if differences else (
        f"other tensors: missing {missing[:3]}, unexpected {unexpected[:3]}, "
        f"other shapes {mismatched[:3]}")
    raise CheckpointError(f"this checkpoint does not fit the model built from the given options: "
                          f"this file was trained with {detail}. Pass the file's options (the "
                          f"model zoo in README.md lists them) or use a checkpoint of this "
                          f"configuration.")


# options that change what a state_dict's tensors mean without always changing their shapes
ARCHITECTURE_OPTIONS = ("backbone", "dilation", "position_embedding", "hidden_dim", "nheads",
                        "enc_layers", "dec_layers", "dim_feedforward", "pre_norm", "enc_rpe2d")


def check_architecture(file_args, args):
    """Raise CheckpointError when architecture options that both record differ."""
    if not isinstance(file_args, argparse.Namespace) or not isinstance(args, argparse.Namespace):
        return
    theirs, ours = vars(file_args), vars(args)
    differences = [f"--{k} {theirs[k]!r} (this run: {ours[k]!r})" for k in ARCHITECTURE_OPTIONS
                   if k in theirs and k in ours and theirs[k] != ours[k]]
    if differences:
        raise CheckpointError(f"this checkpoint was trained with {', '.join(differences)}; "
                              f"pass the file's options to fine-tune from it (only the classes and "
                              f"--num_queries may differ)")


def load_for_finetuning(model, checkpoint, args=None):
    """A checkpoint's weights but the classifier (and other queries) into `model`; returns (names
    loaded, {re-initialised name: "model shape (file: file shape)"})."""
    state_dict, own = checkpoint["model"], model.state_dict()
    fresh = [k for k in own if k.startswith("class_embed.")
             or (k == "query_embed.weight" and k in state_dict and state_dict[k].shape != own[k].shape)]
    check_architecture(checkpoint.get("args"), args)
    check_compatible(model, {**checkpoint, "model": {**state_dict, **{k: own[k] for k in fresh}}}, args)
    loaded = {k: v for k, v in state_dict.items() if k not in fresh}
    model.load_state_dict(loaded, strict=False)  # the fresh ones are the only missing keys
    shapes = {k: f"{tuple(own[k].shape)} (file: "
                 f"{tuple(state_dict[k].shape) if k in state_dict else 'absent'})" for k in fresh}
    return sorted(loaded), shapes
