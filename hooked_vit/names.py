"""Names that configs and command-line options offer as choices (standard library only, so they are
available without importing torch): the 8 circuit sites of a block (:mod:`hooked_vit.sites` maps
each to its hook) and the token selections of an activation (:mod:`hooked_vit.tokens`)."""

from hooked_vit.errors import InvalidArgumentError

SITE_NAMES: tuple[str, ...] = ("norm1", "q", "k", "v", "attn_out", "norm2", "mlp_act", "mlp_out")
TOKEN_CHOICES: tuple[str, ...] = ("cls", "patch", "all")


def check_tokens(tokens: str) -> str:
    """``tokens`` if it is one of :data:`TOKEN_CHOICES`, else a one-line error."""
    if tokens not in TOKEN_CHOICES:
        raise InvalidArgumentError(f"tokens must be one of {', '.join(TOKEN_CHOICES)} (CLS only, patch tokens, or both); "
                                   f"got {tokens!r}")
    return tokens
