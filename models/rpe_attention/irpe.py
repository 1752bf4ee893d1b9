"""iRPE: image relative position encoding (Wu et al., "Rethinking and Improving Relative Position
Encoding for Vision Transformer", ICCV 2021).

The relative position of a query and a key token of an h x w map falls into a bucket
(`piecewise_index`, `bucket_ids`) whose learned table entry enters attention as a bias on the
logits or contextually (a product with q, k or the weights). Use: docs/module-api.md.
"""
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from rpe_ops import rpe_index, rpe_index_backward

from .id_cache import DeviceBoundedCache

METHODS = ("euc", "quant", "cross", "product")
MODES = ("bias", "ctx")

RPE_STRING_GRAMMAR = (
    "expected 'rpe-{ratio}-{method}-{mode}-{shared_head}-{rpe_on}' (or '' for no iRPE): "
    "ratio a float > 0; method one of euc, quant, cross, product; mode bias or ctx; "
    "shared_head 1 (one table for all heads) or 0 (one per head); rpe_on a combination of q, k, v "
    "(bias on v does not exist). Example: rpe-2.0-product-ctx-1-k"
)


def piecewise_index(relative_position: Tensor, alpha: float, beta: float, gamma: float) -> Tensor:
    """The piecewise index g(x) of the paper (Eq. 18), as int64: x rounded where |x| <= alpha,
    else sign(x) * min(beta, round(alpha + ln(|x| / alpha) / ln(gamma / alpha) * (beta - alpha))).
    In float32, rounding half to even (torch.round)."""
    x = relative_position.to(torch.float32)
    x_abs = x.abs()
    far = torch.sign(x) * (
        alpha + torch.log(x_abs.clamp(min=alpha) / alpha) / math.log(gamma / alpha) * (beta - alpha)
    ).round().clamp(max=beta)
    return torch.where(x_abs <= alpha, x.round(), far).to(torch.int64)


def num_buckets_of(method: str, ratio: float, skip: int = 0) -> int:
    """Number of buckets (table entries) of one table for `method` at `ratio`."""
    side = 2 * int(2 * ratio) + 1
    count = side * side if method == "product" else side
    return count + (1 if skip > 0 else 0)


def compute_bucket_ids(method: str, ratio: float, height: int, width: int, skip: int = 0,
                       device: Optional[torch.device] = None) -> Tensor:
    """Bucket ids (L, L) int64 of every (query, key) pair of an h x w map after `skip` tokens
    (L = skip + height * width), which all use the one extra last bucket. Tensor ops only, so
    that TorchScript compiles it and torch.export traces it with a symbolic map size."""
    alpha, beta, gamma = 1 * ratio, 2 * ratio, 8 * ratio
    beta_int = int(beta)
    # an id depends on the offset (dr, dc) alone: computed for its (2h - 1) x (2w - 1) values
    dr = torch.arange(1 - height, height, device=device)[:, None].expand(2 * height - 1, 2 * width - 1)
    dc = torch.arange(1 - width, width, device=device)[None, :].expand(2 * height - 1, 2 * width - 1)
    if method == "euc":
        ids = piecewise_index(torch.sqrt((dr * dr + dc * dc).float()).round(), alpha, beta, gamma)
    elif method == "quant":
        ids = piecewise_index(dr * dr + dc * dc, alpha, beta, gamma)
    elif method == "cross_rows":
        ids = piecewise_index(dr, alpha, beta, gamma)
    elif method == "cross_cols":
        ids = piecewise_index(dc, alpha, beta, gamma)
    elif method == "product":
        ids = (piecewise_index(dr, alpha, beta, gamma) + beta_int) * (2 * beta_int + 1)
        ids = ids + piecewise_index(dc, alpha, beta, gamma)
    else:
        raise ValueError(f"unknown iRPE bucket method {method}; expected euc, quant, cross_rows, "
                         f"cross_cols or product")
    ids = ids + beta_int  # shift into [0, num_buckets); product: the column's shift
    # looked up at (dr, dc) = pos(i) - pos(j) of every pair of the row-major flattened map
    rows = torch.arange(height, device=device)[:, None].expand(height, width).reshape(-1)
    cols = torch.arange(width, device=device)[None, :].expand(height, width).reshape(-1)
    ids = ids[rows[:, None] - rows[None, :] + (height - 1),
              cols[:, None] - cols[None, :] + (width - 1)]
    if skip > 0:
        length = skip + height * width
        padded = torch.full((length, length), num_buckets_of(method, ratio, 0), dtype=torch.int64,
                            device=device)
        padded[skip:, skip:] = ids
        ids = padded
    return ids


# Tables kept per device, bounded in bytes; int32, which the rpe_ops kernels index with as fast as
# int64, in half the memory (a COCO-size table is ~4 MB instead of ~9 MB)
BUCKET_ID_CACHE = DeviceBoundedCache()


def bucket_ids(method, ratio, height, width, skip=0, device=None):
    """`compute_bucket_ids` as int32, computed on the CPU and cached per (method, ratio, map size,
    skip, device) in BUCKET_ID_CACHE. The result is shared: do not modify it in place."""
    device = torch.device("cpu") if device is None else torch.device(device)
    key = (method, float(ratio), int(height), int(width), int(skip), device)
    return BUCKET_ID_CACHE.get(key, device, lambda: _upload(
        compute_bucket_ids(method, ratio, height, width, skip).to(torch.int32), device))


def _upload(ids: Tensor, device: torch.device) -> Tensor:
    # to a GPU through pinned memory: asynchronous, so that the host does not wait for the GPU's
    # queue to drain (a plain copy from pageable memory does)
    if device.type == "cuda":
        return ids.pin_memory().to(device, non_blocking=True)
    return ids.to(device)


@dataclass(frozen=True)
class RPEConfig:
    """How one of q, k, v is encoded."""
    method: str          # euc, quant, cross or product
    mode: str            # bias or ctx
    shared_head: bool    # one table for all heads
    ratio: float         # alpha = ratio, beta = 2 ratio, gamma = 8 ratio
    skip: int = 0        # tokens before the h x w map (e.g. a class token)

    @property
    def num_buckets(self):
        """Entries of one table (for cross: of each of its two tables)."""
        return num_buckets_of(self.method, self.ratio, self.skip)


@dataclass(frozen=True)
class RPEConfigs:
    """The encodings of q, k and v; None where that one is not encoded."""
    rpe_q: Optional[RPEConfig] = None
    rpe_k: Optional[RPEConfig] = None
    rpe_v: Optional[RPEConfig] = None


def get_rpe_config(ratio=1.9, method="product", mode="ctx", shared_head=True, skip=0, rpe_on="k"):
    """The iRPE configuration (RPEConfigs, fields as RPEConfig's; mode 'contextual' means ctx) of
    an attention layer encoding the rpe_on of q, k, v (e.g. 'k' or 'qkv'). ValueError if invalid."""
    method = str(method).lower()
    mode = {"contextual": "ctx"}.get(str(mode).lower(), str(mode).lower())
    if method not in METHODS:
        raise ValueError(f"unknown iRPE method {method!r}; expected one of {', '.join(METHODS)}")
    if mode not in MODES:
        raise ValueError(f"unknown iRPE mode {mode!r}; expected bias or ctx")
    if not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and ratio > 0):
        raise ValueError(f"iRPE ratio must be a number > 0, got {ratio!r}")
    if int(skip) != skip or skip < 0:
        raise ValueError(f"iRPE skip must be an integer >= 0, got {skip!r}")
    rpe_on = str(rpe_on).lower()
    if not rpe_on or set(rpe_on) - set("qkv") or len(set(rpe_on)) != len(rpe_on):
        raise ValueError(f"iRPE rpe_on must be a non-empty combination of q, k, v; got {rpe_on!r}")
    if mode == "bias" and "v" in rpe_on:
        raise ValueError("iRPE in bias mode cannot encode v: use mode ctx, or rpe_on q and/or k")
    one = RPEConfig(method=method, mode=mode, shared_head=bool(shared_head), ratio=float(ratio),
                    skip=int(skip))
    return RPEConfigs(**{f"rpe_{x}": (one if x in rpe_on else None) for x in "qkv"})


def parse_rpe_string(text, skip=0):
    """Parse `rpe-{ratio}-{method}-{mode}-{shared_head}-{rpe_on}` (as `--enc_rpe2d` takes it)
    into an RPEConfigs, None for the empty string. Its ValueErrors show the grammar."""
    def invalid(why=""):
        return ValueError(f"invalid iRPE setting {text!r}: {why}{RPE_STRING_GRAMMAR}")

    if text is None or text == "":
        return None
    fields = text.split("-")
    if len(fields) != 6 or fields[0] != "rpe":
        raise invalid()
    _, ratio, method, mode, shared_head, rpe_on = fields
    try:
        ratio = float(ratio)
    except ValueError:
        raise invalid(f"ratio {ratio!r} is not a number; ") from None
    if shared_head not in ("0", "1"):
        raise invalid("shared_head must be 0 or 1; ")
    try:
        return get_rpe_config(ratio, method, mode, shared_head == "1", skip, rpe_on)
    except ValueError as err:
        raise invalid(f"{err}; ") from None


class iRPE(nn.Module):
    """One relative position encoding with a table T over the buckets b(i, j) of one method.
    For q or k (`transposed`), forward(x (B, H, L, D)) gives logits (B or 1, H, L, L): bias mode
    T[h, b(i, j)], ctx mode sum_d x[n, h, i, d] T[h, d, b(i, j)]. For v (ctx only),
    forward(attn (B, H, L, L)) gives (B, H, L, D): sum_j attn[n, h, i, j] T[h, b(i, j), :]."""

    def __init__(self, head_dim, num_heads, config, transposed=True, method=None):
        super().__init__()
        self.method = method or config.method
        self.mode = config.mode
        self.ratio = config.ratio
        self.skip = config.skip
        self.transposed = transposed
        self.num_buckets = num_buckets_of(self.method, self.ratio, self.skip)
        heads = 1 if config.shared_head else num_heads
        if self.mode == "bias" and not transposed:
            raise ValueError("iRPE in bias mode cannot encode v")
        # both names exist, the unused one as None, so that TorchScript sees the mode in the types
        bias = weight = None
        if self.mode == "bias":
            bias = nn.Parameter(torch.zeros(heads, self.num_buckets))
        elif transposed:
            weight = nn.Parameter(torch.zeros(heads, head_dim, self.num_buckets))
        else:
            weight = nn.Parameter(torch.zeros(heads, self.num_buckets, head_dim))
        self.register_parameter("lookup_table_bias", bias)
        self.register_parameter("lookup_table_weight", weight)

    def bucket_ids(self, length: int, height: Optional[int], width: Optional[int],
                   device: torch.device) -> Tensor:
        if height is not None and width is not None:
            h, w = height, width
        else:
            side = int(math.sqrt(max(length - self.skip, 0)) + 0.5)
            if side * side != length - self.skip:
                raise ValueError(f"iRPE needs the map size (height, width) for {length} tokens "
                                 f"({self.skip} skip): pass hw=(h, w)")
            h, w = side, side
        if h * w + self.skip != length:
            raise ValueError(f"iRPE got {length} tokens, but a {h}x{w} map with "
                             f"{self.skip} skip tokens has {h * w + self.skip}")
        if torch.jit.is_scripting():
            return compute_bucket_ids(self.method, self.ratio, h, w, self.skip, device)
        return self._eager_bucket_ids(h, w, device)

    @torch.jit.unused
    def _eager_bucket_ids(self, height: int, width: int, device: torch.device) -> Tensor:
        if torch.compiler.is_compiling():
            # traced (torch.export, torch.compile): the ids become ops on the map size, which may
            # be symbolic; the cache, keyed on ints, would fix the graph to one size
            return compute_bucket_ids(self.method, self.ratio, height, width, self.skip, device)
        return bucket_ids(self.method, self.ratio, int(height), int(width), self.skip, device)

    def lookup(self, x: Tensor, height: Optional[int] = None,
               width: Optional[int] = None) -> Tuple[Tensor, Tensor]:
        """For q or k: (table (B or 1, H or 1, L, num_buckets), a view in bias mode; ids (L, L))
        with forward(x) = table[b, h, i, ids[i, j]]."""
        if not self.transposed:
            raise ValueError("iRPE.lookup is for the encodings of q and k")
        ids = self.bucket_ids(x.shape[2], height, width, x.device)
        if self.lookup_table_bias is not None:
            bias = self.lookup_table_bias
            return bias[None, :, None, :].expand(1, bias.shape[0], x.shape[2], bias.shape[1]), ids
        return torch.matmul(x, self.lookup_table_weight), ids

    def fused_terms(self, x: Tensor, height: Optional[int] = None, width: Optional[int] = None
                    ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        """What the fused attention kernel takes of this encoding of k: (table, ids, None)."""
        table, ids = self.lookup(x, height, width)
        return table, ids, None

    def forward(self, x: Tensor, height: Optional[int] = None, width: Optional[int] = None) -> Tensor:
        ids = self.bucket_ids(x.shape[2], height, width, x.device)
        bias, weight = self.lookup_table_bias, self.lookup_table_weight
        if bias is not None:
            return bias[:, ids].unsqueeze(0)
        if weight is None:
            raise RuntimeError("iRPE: no lookup table")
        if self.transposed:
            return rpe_index(torch.matmul(x, weight), ids)
        return torch.matmul(rpe_index_backward(x, ids, self.num_buckets), weight)

    def extra_repr(self):
        return (f"method={self.method}, mode={self.mode}, ratio={self.ratio}, "
                f"num_buckets={self.num_buckets}, skip={self.skip}, transposed={self.transposed}")


class iRPECross(nn.Module):
    """The cross method: independent row and column encodings (tables `rp_rows`, `rp_cols`), summed."""

    def __init__(self, head_dim, num_heads, config, transposed=True):
        super().__init__()
        self.rp_rows = iRPE(head_dim, num_heads, config, transposed, method="cross_rows")
        self.rp_cols = iRPE(head_dim, num_heads, config, transposed, method="cross_cols")

    def forward(self, x: Tensor, height: Optional[int] = None, width: Optional[int] = None) -> Tensor:
        return self.rp_rows(x, height, width) + self.rp_cols(x, height, width)

    def fused_terms(self, x: Tensor, height: Optional[int] = None, width: Optional[int] = None
                    ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        """What the fused attention kernel takes of this encoding of k: (None, None, the logits
        term), as the kernel has one table lookup only."""
        return None, None, self.forward(x, height, width)


def _build_one(config, head_dim, num_heads, transposed):
    if config is None:
        return None
    module = iRPECross if config.method == "cross" else iRPE
    return module(head_dim, num_heads, config, transposed)


def build_rpe(config, head_dim, num_heads):
    """(rpe_q, rpe_k, rpe_v), each an iRPE module or None, for `config` (an RPEConfigs, or None
    for no iRPE). The tables start at zero."""
    if config is None:
        return None, None, None
    return (_build_one(config.rpe_q, head_dim, num_heads, transposed=True),
            _build_one(config.rpe_k, head_dim, num_heads, transposed=True),
            _build_one(config.rpe_v, head_dim, num_heads, transposed=False))
