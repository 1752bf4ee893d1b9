"""Mixed precision (--amp): the model's forward under torch.autocast, its outputs in float32."""
import warnings

import torch
import torch.utils._pytree as pytree

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def check_supported(device_type, dtype):
    """Raise ValueError saying what to pass instead when autocast cannot run `dtype` here."""
    name = str(dtype).replace("torch.", "")
    if not torch.amp.is_autocast_available(device_type):
        raise ValueError(f"--amp: autocast is not available on device type '{device_type}'; "
                         f"run without --amp")
    if device_type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError("--amp: this GPU has no bfloat16 support; pass --amp_dtype float16")
    # autocast warns and switches itself off for a dtype the device type does not support
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.autocast(device_type, dtype=dtype):
            probe = torch.ones(2, 2, device=device_type)
            result = (probe @ probe).dtype
    if result != dtype:
        hint = "pass --amp_dtype bfloat16" if dtype != torch.bfloat16 else "run without --amp"
        detail = f" ({' '.join(str(caught[0].message).split())})" if caught else ""
        raise ValueError(f"--amp: autocast on {device_type} does not support {name} in this "
                         f"PyTorch{detail}; {hint}")


def to_float32(outputs):
    """The model's outputs (nested dicts and lists) with every floating tensor in float32."""
    return pytree.tree_map_only(torch.Tensor, lambda t: t.float() if t.is_floating_point() else t,
                                outputs)


def forward(model, samples, device, dtype=None):
    """model(samples) under autocast in `dtype` (None: none), outputs in float32."""
    if dtype is None:
        return model(samples)
    with torch.autocast(torch.device(device).type, dtype=dtype):
        outputs = model(samples)
    return to_float32(outputs)


def build(args, device):
    """(autocast dtype or None, GradScaler or None) from --amp / --amp_dtype."""
    if not args.amp:
        return None, None
    dtype = DTYPES[args.amp_dtype]
    check_supported(device.type, dtype)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    return dtype, scaler
