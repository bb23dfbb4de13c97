"""hooked-vit: TransformerLens-style hooks on timm Vision Transformers (DeiT-III)."""

from hooked_vit.cache import ViTActivationCache
from hooked_vit.config import HookedViTConfig
from hooked_vit.model import HookedViT
from hooked_vit.sites import SITE_NAMES, Site, SiteRegistry

__all__ = ["HookedViT", "HookedViTConfig", "ViTActivationCache", "SITE_NAMES", "Site", "SiteRegistry"]
__version__ = "0.1.0"
