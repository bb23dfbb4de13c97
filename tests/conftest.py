"""Shared fixtures. hooked_vit is imported inside fixtures, never at module level here, so that
jaxtyping's import hook (pytest --jaxtyping-packages, set in pyproject.toml) instruments it."""

from __future__ import annotations

import os

# One torch thread per test process (and its subprocesses) unless the caller sets OMP_NUM_THREADS:
# the suite's tensors are small, and on a shared machine two spinning OpenMP threads per process
# made single steps 10-20x slower. Numbers are compared within one process, so this changes no result.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def randomize_layer_scale(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Set every LayerScale gamma to U(0.5, 1.5): at timm's 1e-6 init every block is nearly the
    identity and parity tests would compare almost nothing."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gamma"):
                param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
    return model


def make_timm(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A random-init timm model of a real architecture with O(1) LayerScale, in eval mode."""
    torch.manual_seed(seed)
    return randomize_layer_scale(timm.create_model(name, pretrained=False, **kwargs), seed).eval()


@pytest.fixture(scope="session")
def timm_deit3_base() -> torch.nn.Module:
    """deit3_base_patch16_224 with random weights (12 blocks, 86M parameters)."""
    return make_timm("deit3_base_patch16_224")


@pytest.fixture(scope="session")
def hooked_deit3_base(timm_deit3_base):
    from hooked_vit import HookedViT

    return HookedViT.from_timm(timm_deit3_base)


@pytest.fixture(scope="session")
def images_224() -> torch.Tensor:
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def small_hooked():
    """A 2-block DeiT-III-small-width model: real block structure, fast enough to hook everything."""
    from hooked_vit import HookedViT

    return HookedViT.from_timm(make_timm("deit3_small_patch16_224", depth=2, img_size=64))


@pytest.fixture(scope="session")
def images_64() -> torch.Tensor:
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def tiny():
    """A 2-block DeiT-III (width 32, 2 heads, 17 tokens) with O(1) LayerScale, fresh per module."""
    from hooked_vit import HookedViT

    return HookedViT.from_timm(make_timm("deit3_small_patch16_224", depth=2, img_size=32, patch_size=8,
                                         embed_dim=32, num_heads=2))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A variant cache of its own for the module (its variants are built once), as $HOOKED_VIT_CACHE."""
    path = tmp_path_factory.mktemp("cache")
    previous = os.environ.get("HOOKED_VIT_CACHE")
    os.environ["HOOKED_VIT_CACHE"] = str(path)
    yield path
    if previous is None:
        del os.environ["HOOKED_VIT_CACHE"]
    else:
        os.environ["HOOKED_VIT_CACHE"] = previous


# The modules that take longest (measured with --durations), run first: pytest-xdist hands each
# worker whole modules in collection order, so a long module collected late would leave the other
# worker idle at the end.
LONGEST_FIRST = ("test_impact.py", "test_model_parity.py", "test_recovery.py", "test_families_clip_siglip.py",
                 "test_level_interface.py", "test_default_model.py", "test_pruning.py", "test_loading.py",
                 "test_circuits_runner.py", "test_neuron_level.py", "test_embedded_models.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))  # stable: order within kept
