from .irpe import build_rpe, get_rpe_config, parse_rpe_string
from .multi_head_attention import RPEMultiheadAttention

__all__ = ["RPEMultiheadAttention", "build_rpe", "get_rpe_config", "parse_rpe_string"]
