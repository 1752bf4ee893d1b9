"""iRPE attention in PyTorch's flex attention: softmax(q k^T + iRPE terms + padding mask) v in one
compiled kernel (and one for its backward), without the (N, H, L, S) bias tensor.

The iRPE terms enter as a `score_mod` reading the small tables of iRPE.lookup (on k: score[i, j]
+= table[b, h, i, ids[i, j]]; on q, transposed: table[b, h, j, ids[j, i]]); the key padding mask
is a block mask. Kernels are specialised on the sequence length, so q, k, v and the tables are
zero-padded to a multiple of LENGTH_STEP (padded keys masked, padded query rows dropped): COCO's
multi-scale lengths (225..1050) compile 8 times. Where the layers take this path: `flex_applies`.
"""
import importlib.util
import weakref
from collections import OrderedDict
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from .irpe import iRPECross

LENGTH_STEP = 128  # flex attention's block size: the padding never adds a block
# distinct padded lengths x encodings x dtypes that may each compile once (dynamo's default, 8,
# would be reached by multi-scale training)
MAX_COMPILATIONS = 64

# Where the flex path replaces the SDPA path in training on CUDA, by the layer's iRPE mode (None:
# no iRPE); benchmarks/attention_paths.py prints both paths' times beside this choice.
USE_FLEX = {"ctx": True, "bias": True, None: False}

# its CUDA kernels are Triton's
_HAS_TRITON = importlib.util.find_spec("triton") is not None
_compiled = None


def _flex_attention():
    """torch.compile(flex_attention), made at the first call (compiling costs seconds)."""
    global _compiled
    if _compiled is None:
        from torch.nn.attention.flex_attention import flex_attention
        _compiled = torch.compile(flex_attention, dynamic=False, fullgraph=True)
    return _compiled


def _irpe_mode(layer) -> Optional[str]:
    for rpe in (layer.rpe_q, layer.rpe_k, layer.rpe_v):
        if rpe is not None:
            return (rpe.rp_rows if isinstance(rpe, iRPECross) else rpe).mode
    return None


def flex_applies(layer, q: Tensor, need_weights: bool, attn_mask: Optional[Tensor],
                 key_padding_mask: Optional[Tensor]) -> bool:
    """Whether RPEMultiheadAttention `layer` computes steps 2 to 5 of its forward here: training
    on CUDA only (eval mode gives the TorchScript form's numbers, uncompiled), without attention
    dropout (flex applies none), the weights, iRPE on v, an attn_mask or a float key padding mask;
    head sizes a power of two >= 16, with Triton, not traced. Then USE_FLEX decides."""
    head_dim = q.shape[-1]
    return (layer.use_fused_kernels and q.is_cuda and _HAS_TRITON and layer.training
            and layer.dropout == 0.0 and not need_weights and layer.rpe_v is None
            and attn_mask is None
            and (key_padding_mask is None or key_padding_mask.dtype == torch.bool)
            and q.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and head_dim >= 16 and head_dim & (head_dim - 1) == 0
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and USE_FLEX.get(_irpe_mode(layer), False))


def _padded_length(length: int) -> int:
    return -(-length // LENGTH_STEP) * LENGTH_STEP


def _pad_rows(x: Tensor, length: int) -> Tensor:
    """x (..., L, C) zero-padded to (..., length, C)."""
    return x if x.shape[-2] == length else F.pad(x, (0, 0, 0, length - x.shape[-2]))


# padded copies of the cached bucket-id tables (irpe.BUCKET_ID_CACHE), kept as long as the table
_PADDED_IDS = WeakIdKeyDictionary()


def _padded_ids(ids: Tensor, length: int) -> Tensor:
    if ids.shape[0] == length:
        return ids
    padded = _PADDED_IDS.get(ids)
    if padded is None or padded.shape[0] != length:
        padded = F.pad(ids, (0, length - ids.shape[1], 0, length - ids.shape[0]))
        _PADDED_IDS[ids] = padded
    return padded


def _terms(rpe, x: Tensor, height: Optional[int], width: Optional[int],
           transposed: bool) -> List[Tuple[Tensor, Tensor, bool]]:
    """(table, ids, transposed) of each table of an iRPE module (two for cross)."""
    if rpe is None:
        return []
    modules = [rpe.rp_rows, rpe.rp_cols] if isinstance(rpe, iRPECross) else [rpe]
    return [(*m.lookup(x, height, width), transposed) for m in modules]


# block masks by key padding mask and lengths: every encoder layer of a forward shares one
_BLOCK_MASKS: "OrderedDict[tuple, tuple]" = OrderedDict()
_MAX_BLOCK_MASKS = 8


def _block_mask(key_padding_mask: Optional[Tensor], key_length: int, padded_length: int,
                padded_key_length: int, device: torch.device):
    """The block mask of the keys to ignore (padding and the padded tail); None if none are."""
    from torch.nn.attention.flex_attention import create_block_mask
    if key_padding_mask is None and key_length == padded_key_length:
        return None
    key = (padded_length, padded_key_length, key_length, device,
           None if key_padding_mask is None else (id(key_padding_mask), key_padding_mask._version))
    entry = _BLOCK_MASKS.get(key)
    if entry is not None and (entry[0] is None or entry[0]() is key_padding_mask):
        _BLOCK_MASKS.move_to_end(key)
        return entry[1]
    ignored = key_padding_mask
    if ignored is None:
        ignored = torch.zeros(1, key_length, dtype=torch.bool, device=device)
    ignored = F.pad(ignored, (0, padded_key_length - key_length), value=True)
    per_image = ignored.shape[0] > 1

    def keep(b, h, q_idx, kv_idx):
        return ~ignored[b if per_image else 0, kv_idx]

    mask = create_block_mask(keep, ignored.shape[0], None, padded_length, padded_key_length,
                             device=device, BLOCK_SIZE=LENGTH_STEP)
    owner = None if key_padding_mask is None else weakref.ref(key_padding_mask)
    _BLOCK_MASKS[key] = (owner, mask)
    while len(_BLOCK_MASKS) > _MAX_BLOCK_MASKS:
        _BLOCK_MASKS.popitem(last=False)
    return mask


def irpe_flex_attention(q: Tensor, k: Tensor, v: Tensor, rpe_q=None, rpe_k=None,
                        key_padding_mask: Optional[Tensor] = None, height: Optional[int] = None,
                        width: Optional[int] = None, scaling: float = 1.0) -> Tensor:
    """softmax(q k^T + rpe_k(q) + rpe_q(k * scaling)^T, keys masked by key_padding_mask) v:
    q (N, H, L, D), already scaled; k, v (N, H, S, D); rpe_q, rpe_k iRPE / iRPECross modules or
    None; key_padding_mask (N, S) bool, True on keys to ignore. Returns (N, H, L, D) in q's dtype:
    the plain path's, up to float rounding (a row whose keys are all masked gives zeros, not nan).
    """
    length, key_length = q.shape[2], k.shape[2]
    terms = _terms(rpe_k, q, height, width, False) + _terms(rpe_q, k * scaling, height, width, True)
    padded_length, padded_key_length = _padded_length(length), _padded_length(key_length)
    captured = []
    for table, ids, transposed in terms:
        # a table's rows are queries (on k) or keys (on q): self-attention, L == S, padded alike
        captured.append((_pad_rows(table, padded_length), _padded_ids(ids, padded_length),
                         transposed, table.shape[0] > 1, table.shape[1] > 1))

    def score_mod(score, b, h, q_idx, kv_idx):
        for table, ids, transposed, per_image, per_head in captured:
            row, col = (kv_idx, q_idx) if transposed else (q_idx, kv_idx)
            score = score + table[b if per_image else 0, h if per_head else 0, row, ids[row, col]]
        return score

    block_mask = _block_mask(key_padding_mask, key_length, padded_length, padded_key_length,
                             q.device)
    with torch._dynamo.config.patch(recompile_limit=MAX_COMPILATIONS):
        out = _flex_attention()(_pad_rows(q, padded_length), _pad_rows(k, padded_key_length),
                                _pad_rows(v, padded_key_length),
                                score_mod=score_mod if captured else None,
                                block_mask=block_mask, scale=1.0)
    return out[:, :, :length]
