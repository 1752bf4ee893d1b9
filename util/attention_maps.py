"""The encoder's self-attention maps (iRPE included), captured during an ordinary forward pass."""
import contextlib
import inspect


@contextlib.contextmanager
def capture_encoder_attention(model, layer=-1):
    """Within the block, every forward of `model` (a DETR) fills the yielded dict with encoder
    layer `layer`'s self-attention:

        'weights'  (B, h*w, h*w) averaged over heads; row i is where token i looks (softmax over keys)
        'hw'       (h, w), the feature map the tokens were flattened from (row-major)
        'padding'  (B, h*w) True on padded positions, or None

    A pre-hook asks the layer for its weights (need_weights=True): its output changes by float
    rounding at most (CPU inference without weights takes PyTorch's SDPA, with them the fused
    kernel).
    """
    attention = model.transformer.encoder.layers[layer].self_attn
    signature = inspect.signature(attention.forward)
    captured = {}

    def ask_for_weights(module, args, kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.arguments["need_weights"] = True
        captured["hw"] = bound.arguments.get("hw")
        captured["padding"] = bound.arguments.get("key_padding_mask")
        return bound.args, bound.kwargs

    def keep_weights(module, args, output):
        captured["weights"] = output[1]

    handles = [attention.register_forward_pre_hook(ask_for_weights, with_kwargs=True),
               attention.register_forward_hook(keep_weights)]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()
