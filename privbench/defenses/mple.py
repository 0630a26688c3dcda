"""MpLe (Onesimu & Karthikeyan 2021), after MoLe (Wang et al., KDD 2018): morphed images and an
augmented first convolution.

Protocol and threat model
-------------------------
Parties: a **data provider** (the hospital) and a **service provider** that trains a network for it.

- The provider holds the first convolution ``C_r`` (frozen: the model's seeded initialization, or
  the first layer of ImageNet VGG-16; public by default, secret with ``cr_secret=true``), one
  secret invertible matrix ``M`` [D, D] (D = padded pixels, 1156 for 1x32x32 with padding 1) and a
  secret permutation of C_r's output channels. Real patient images touch only the provider's side
  in clear.
- The provider sends, for every training image ``d`` (and every image it later asks about), the
  morphed ``t = pad(d) M`` [D], and once the augmented layer ``C_ac = M^-1 W_r P`` (C_r as a dense
  matrix with permuted output channels, plus C_r's permuted bias).
- The service provider trains the rest of the network on ``t`` with ``C_ac`` frozen as its first
  layer; ``t C_ac`` equals the permuted first-layer features of ``d``, so nothing is lost.

C_r is the convolution the model applies first to the image, found by a forward pass with hooks
(``find_first_conv``): the first layer of convnet and vgg, the ResNet stem's convolution. The
service's network is a copy of the model with ``FeaturesIn`` in C_r's place (the rest consumes the
features C_ac computes); the released image-space model is the same copy with C_r back, its output
channels permuted (``fold_permutation``). In a sequential model the layers up to the next
convolution are permuted to follow (the plain model's function at init); in any other model (the
ResNet stem feeds identity shortcuts) the rest trains from its own seeded init on permuted features,
and the training record says which (``permutation_compensated``, ``service_init``).

Surfaces: SHARED_DATA is the service provider's view (the victim batch's ``t``, ``C_ac``, the
trained network after the first layer, C_r's kernel when public; ``M``, the permutation and a
secret C_r are never in it). GRADIENTS is an outside eavesdropper on the service's training
updates: gradients of the service network on the morphed victim batch, in morphed space (the
service itself already holds ``t``, so for it a gradient attack adds nothing). MODEL_WHITEBOX /
MODEL_QUERIES: the end-to-end model on images (morphing then the service network), which is the
same function as C_r, the permutation and the trained rest; MpLe does not protect it.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from privbench import morphing, registry
from privbench.claims import MPLE_CLAIMS
from privbench.config import ConfigError, derive_seed
from privbench.defenses.base import (
    Defense,
    FitContext,
    Target,
    client_gradients,
    fit_plainly,
    gradient_observation,
    model_at_round,
    released_model_observation,
)
from privbench.morphing import AugmentedConv, ConvGeometry, MorphingError
from privbench.params import bounded
from privbench.threat import MorphedLayer, Observation, SharedData, Surface, Victim
from privbench.training import TensorSet, TrainParams, accuracy, train_classifier


@dataclass(frozen=True)
class FirstLayerParams:
    """How the provider's frozen first convolution C_r is chosen."""

    first_layer: Literal["random", "vgg16-imagenet"] = "random"  # seeded init, or VGG-16's (needs 64 3x3 filters)


@dataclass(frozen=True)
class MpLeParams(TrainParams, FirstLayerParams):
    matrix: Literal["orthogonal", "gaussian"] = "orthogonal"  # kind of the secret morphing matrix M
    max_condition: float = bounded(1e4, gt=1, le=1e16)  # a gaussian M is redrawn until its condition number is below this
    cr_secret: bool = False  # keep C_r from the service provider (only C_ac reveals it)
    max_memory_gb: float = bounded(0.0, ge=0, le=1e6)  # refuse configurations whose matrices need more; 0: half the available memory

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_condition <= 1 or self.max_memory_gb < 0:
            raise ValueError("max_condition must be > 1 and max_memory_gb >= 0")


@dataclass
class Secrets:
    """What the data provider keeps: M [D, D] float64, the channel permutation [F], and their geometry."""

    matrix: torch.Tensor
    condition: float
    permutation: torch.Tensor
    geometry: ConvGeometry


class FeaturesIn(nn.Module):
    """Stands where C_r was in the service's copy of the model: passes its input through, so the rest of
    the model consumes the first-layer features that the augmented layer computed from the morphed vector."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


@dataclass(frozen=True)
class FirstConv:
    """The convolution a model applies first, to its input itself: its qualified name in the model and
    whether the model is a plain ``nn.Sequential`` that starts with it (then the layers after it can be
    permuted to follow C_r's secret channel order; see ``permute_leading_channels``)."""

    path: str
    sequential: bool


def find_first_conv(model: nn.Module, image_shape: tuple[int, int, int]) -> FirstConv:
    """Locate the Conv2d that ``model`` applies first to its input, by a forward pass of a zero image
    [1, C, H, W] on a copy (eval mode) with pre-hooks on every leaf module.

    Raises ConfigError when the first leaf module called is not a Conv2d, when that convolution does not
    take the input tensor itself (an operation comes before it), when it is called more than once, or
    when another leaf module also reads the input (the rest would then see features in its place).
    """
    probe = copy.deepcopy(model).eval()
    first = next(probe.parameters(), None)
    x = torch.zeros(1, *image_shape, dtype=first.dtype if first is not None else torch.float32)
    calls: list[tuple[str, nn.Module, bool]] = []
    handles = []
    for name, module in probe.named_modules():
        if name and not any(True for _ in module.children()):
            def record(module, args, name=name):
                calls.append((name, module, any(a is x for a in args)))
            handles.append(module.register_forward_pre_hook(record))
    try:
        with torch.no_grad():
            probe(x)
    finally:
        for handle in handles:
            handle.remove()
    kind = type(model).__name__
    if not calls or not isinstance(calls[0][1], nn.Conv2d) or not calls[0][2]:
        what = "nothing" if not calls else f"{type(calls[0][1]).__name__} {calls[0][0]!r}" + (
            "" if calls[0][2] else " on a tensor computed from the image")
        raise ConfigError(f"mple folds its morphing into the convolution a model applies first to the image; "
                          f"{kind} applies {what} first")
    path, conv, _ = calls[0]
    if sum(1 for _, module, _ in calls if module is conv) > 1:
        raise ConfigError(f"mple: {kind} applies its first convolution {path!r} more than once; the service "
                          f"replaces it, so it must be applied to the image only")
    readers = [name for name, module, on_image in calls[1:] if on_image and module is not conv]
    if readers:
        raise ConfigError(f"mple: in {kind} the image also reaches {', '.join(readers)} besides the first "
                          f"convolution {path!r}; the service sees only morphed vectors, so C_r must be the only "
                          f"layer that reads the image")
    return FirstConv(path, isinstance(model, nn.Sequential) and path == "0")


def replace_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` in place of ``model``'s submodule at the qualified name ``path``, in place."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


def first_conv(model: nn.Module, image_shape: tuple[int, int, int]) -> tuple[FirstConv, nn.Conv2d]:
    """The first convolution on the image (located by ``find_first_conv``) and where it is, after checking
    that morphing can fold into it (stride 1, dilation 1, one group, square kernel and padding)."""
    where = find_first_conv(model, image_shape)
    conv = model.get_submodule(where.path)
    try:
        ConvGeometry.of(conv, image_shape)
    except MorphingError as exc:
        raise ConfigError(f"mple: {type(model).__name__}'s first convolution {where.path!r} cannot carry the "
                          f"morphing: {exc}. Use --model convnet, vgg or resnet.") from exc
    return where, conv


_CHANNELWISE = (nn.ReLU, nn.Sigmoid, nn.Tanh, nn.MaxPool2d, nn.AvgPool2d, nn.Dropout, FeaturesIn)


def carries_permutation(rest: list[nn.Module]) -> bool:
    """Whether ``permute_leading_channels`` can carry a channel permutation through ``rest``: only
    channel-wise layers (activations, pooling, dropout, BatchNorm2d) up to a Conv2d that absorbs it."""
    for module in rest:
        if isinstance(module, nn.Conv2d):
            return module.groups == 1
        if not isinstance(module, (*_CHANNELWISE, nn.BatchNorm2d)):
            return False
    return False


def permute_leading_channels(rest: list[nn.Module], permutation: torch.Tensor) -> None:
    """Permute, in place, the input channels of ``rest`` up to its first convolution, so that
    ``rest(x[:, permutation])`` computes what the unpermuted ``rest(x)`` did."""
    if not carries_permutation(rest):
        kinds = ", ".join(type(m).__name__ for m in rest[:4])
        raise ConfigError(f"mple cannot carry the channel permutation through {kinds}: only channel-wise layers "
                          f"up to an ungrouped Conv2d")
    for module in rest:
        if isinstance(module, nn.Conv2d):
            with torch.no_grad():
                module.weight.copy_(module.weight[:, permutation])
            return
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                for tensor in (module.weight, module.bias, module.running_mean, module.running_var):
                    if tensor is not None:
                        tensor.copy_(tensor[permutation])


def fold_permutation(conv: nn.Conv2d, permutation: torch.Tensor) -> nn.Conv2d:
    """A frozen copy of ``conv`` whose output channel j is ``conv``'s channel permutation[j]."""
    folded = copy.deepcopy(conv)
    with torch.no_grad():
        folded.weight.copy_(conv.weight[permutation])
        if conv.bias is not None:
            folded.bias.copy_(conv.bias[permutation])
    return folded.requires_grad_(False)


def conv_bias(conv: nn.Conv2d) -> torch.Tensor:
    """C_r's bias [F] (zeros when the convolution has none, as the ResNet stem's)."""
    if conv.bias is None:
        return torch.zeros(conv.out_channels, dtype=conv.weight.dtype)
    return conv.bias.detach()


def prepare_first_layer(model: nn.Module, params: FirstLayerParams, image_shape: tuple[int, int, int]) -> nn.Conv2d:
    """Set C_r (seeded init or VGG-16's first layer) and freeze it; returns it."""
    _, conv = first_conv(model, image_shape)
    if params.first_layer == "vgg16-imagenet":
        from privbench.metrics.weights import WeightsMissing, load_state_dict

        if conv.out_channels != 64 or conv.kernel_size != (3, 3) or conv.in_channels not in (1, 3) or conv.bias is None:
            raise ConfigError("first_layer=vgg16-imagenet needs a first conv of 64 3x3 filters with a bias on 1 or 3 "
                              "channels (--model vgg, or --model convnet --model-param width=64)")
        try:
            state = load_state_dict("vgg16")
        except WeightsMissing as exc:
            raise ConfigError(f"mple first_layer=vgg16-imagenet: {exc}") from exc
        weight = state["features.0.weight"]
        if conv.in_channels == 1:  # a gray image is R = G = B: the filter on it is the sum over RGB
            weight = weight.sum(1, keepdim=True)
        with torch.no_grad():
            conv.weight.copy_(weight)
            conv.bias.copy_(state["features.0.bias"])
    conv.requires_grad_(False)
    return conv


def check_memory(geometry: ConvGeometry, limit_gb: float) -> None:
    """Refuse before allocating: building C_ac needs it in float64 and in float32 (plus M and M^-1)."""
    needed = geometry.dense_bytes(torch.float64) + geometry.dense_bytes(torch.float32) + 2 * 8 * geometry.padded**2
    limit = limit_gb * 1e9 if limit_gb > 0 else morphing.available_memory_bytes() / 2
    if needed > limit:
        raise ConfigError(
            f"mple: C_ac for {geometry.describe()} is {geometry.padded} x {geometry.features} floats "
            f"({geometry.dense_bytes() / 1e6:.0f} MB in float32); building it needs {needed / 1e9:.2f} GB, over the "
            f"limit of {limit / 1e9:.2f} GB. Use a smaller --image-size or model width, or raise max_memory_gb."
        )


class MorphedService(nn.Module):
    """The service provider's network: C_ac (frozen) on morphed vectors [B, D] (or [B, 1, 1, D]), then the rest.

    ``rest`` takes the first-layer features [B, F, H', W']: a list of layers (run in sequence) or a module,
    as ``service_body`` builds it (the model with ``FeaturesIn`` in C_r's place).
    """

    def __init__(self, first: AugmentedConv, rest: list[nn.Module] | nn.Module):
        super().__init__()
        self.first = first
        self.rest = rest if isinstance(rest, nn.Module) else nn.Sequential(*rest)

    def forward(self, morphed: torch.Tensor) -> torch.Tensor:
        return self.rest(self.first(morphed.flatten(1)))


def service_body(model: nn.Module, where: FirstConv) -> nn.Module:
    """A copy of ``model`` with ``FeaturesIn`` in place of its first convolution: the service's network
    after the first layer (its input: the first-layer features)."""
    body = copy.deepcopy(model)
    replace_submodule(body, where.path, FeaturesIn())
    return body


def released_model(body: nn.Module, where: FirstConv, folded: nn.Conv2d) -> nn.Module:
    """The image-space model: a copy of the service body with the folded C_r back in the convolution's place
    (the architecture and state-dict names of the plain model)."""
    released = copy.deepcopy(body)
    replace_submodule(released, where.path, copy.deepcopy(folded))
    return released


@registry.defenses.register("mple")
class MpLe(Defense):
    """MpLe morphing defense; the protocol and threat model are in the module docstring."""

    Params = MpLeParams
    description = (
        "MpLe/MoLe morphing: provider sends t = d M (secret invertible M) and C_ac = M^-1 C_r P; the service trains "
        "on t. Real images stay with the provider; the service sees t, C_ac, its model (and C_r unless cr_secret). "
        "Released model unprotected."
    )
    # Measured: with C_r public (the default), mple-feature-leak recovers the images from SHARED_DATA and
    # invgrad-mple from GRADIENTS (46-47 dB PSNR at 2,000 evaluations on brain-tumor-mri 32x32); with a secret
    # C_r the images' structure still comes back (SSIM 0.57-0.88). No surface is credited as protected.
    protects: frozenset[Surface] = frozenset()
    models = ("convnet", "vgg", "resnet")
    default_model = "convnet"
    tiny_params = {"epochs": 1, "batch_size": 16}
    paper_claims = MPLE_CLAIMS
    models_reason = ("MpLe folds its secret morphing into the layer the model applies first to the image, which must "
                     "be a stride-1, undilated, ungrouped convolution with a square kernel (lenet's first convolution "
                     "has stride 2; capsnet's has stride 2 on images of 64 px or more)")

    def identity(self) -> dict:
        """``cr_secret`` decides what the service is told, not how the target is trained."""
        identity = super().identity()
        identity["params"].pop("cr_secret")
        return identity

    def secrets(self, conv: nn.Conv2d, image_shape: tuple[int, int, int], seed: int) -> Secrets:
        """The provider's M and permutation from its ``secrets`` seed (reproducible, never stored or released)."""
        geometry = ConvGeometry.of(conv, image_shape)
        check_memory(geometry, self.params.max_memory_gb)
        matrix, condition = morphing.secret_matrix(
            geometry.padded, self.params.matrix, derive_seed(seed, "mple-matrix"), self.params.max_condition)
        generator = torch.Generator().manual_seed(derive_seed(seed, "mple-permutation"))
        return Secrets(matrix, condition, torch.randperm(conv.out_channels, generator=generator), geometry)

    def morph(self, images: torch.Tensor, secrets: Secrets) -> torch.Tensor:
        """t = pad(d) M: [B, C, H, W] -> float32 [B, D] (computed in float64)."""
        try:
            flat = morphing.pad_flat(images, secrets.geometry)
        except MorphingError as exc:
            raise ConfigError(f"mple: {exc}") from exc
        return (flat.double() @ secrets.matrix).float()

    def augmented(self, conv: nn.Conv2d, secrets: Secrets) -> AugmentedConv:
        geometry = secrets.geometry
        c_ac = morphing.augmented_layer(secrets.matrix, conv.weight.detach(), secrets.permutation, geometry)
        return AugmentedConv(c_ac.float(), conv_bias(conv)[secrets.permutation].clone(), geometry.feature_shape)

    def fit(self, model: nn.Module, members, ctx: FitContext) -> Target:
        p: MpLeParams = self.params
        image_shape = members.image_shape
        conv = prepare_first_layer(model, p, image_shape)
        where = find_first_conv(model, image_shape)
        t0 = time.perf_counter()
        secrets = self.secrets(conv, image_shape, ctx.seeds["secrets"])
        first = self.augmented(conv, secrets)
        setup_s = time.perf_counter() - t0
        body = service_body(model, where)
        after = list(body)[1:] if where.sequential else []
        compensated = where.sequential and carries_permutation(after)
        if compensated:
            # The service's own init, with its input channels permuted: the same function as the plain model at
            # init, so MpLe and its twin differ only by the morphing.
            permute_leading_channels(after, secrets.permutation)
            service_init = ("the layers after C_r start from the model's seeded init with their input channels "
                            "permuted to C_r's secret order: at init the released model computes what the plain "
                            "model (the utility twin's start) computes")
        else:
            service_init = ("the model is not a sequence of channel-wise layers up to a convolution after C_r (a "
                            "ResNet stem feeds identity shortcuts), so the secret channel permutation is not carried "
                            "into its later layers: the service trains them from the model's own seeded init on "
                            "permuted features, an equally random start (the utility twin starts from the same init "
                            "on unpermuted features)")
        service = MorphedService(first, body)
        # The released image-space model: C_r with its output channels permuted, folded into one plain
        # convolution, so the permutation itself is not a tensor of the release.
        folded = fold_permutation(conv, secrets.permutation)
        initial_state = copy.deepcopy(released_model(body, where, folded).state_dict())

        t0 = time.perf_counter()
        morphed = self.morph(members.images, secrets)
        morph_s = time.perf_counter() - t0
        progress = (lambda done, total: ctx.progress("train", done, total)) if ctx.progress else None
        record = train_classifier(service, TensorSet(morphed, members.labels), p, ctx.seeds["train"], progress)
        released = released_model(service.rest, where, folded)
        nonmembers_morphed = self.morph(ctx.nonmembers.images, secrets)
        service_accuracy = accuracy(service, TensorSet(nonmembers_morphed, ctx.nonmembers.labels))
        with torch.no_grad():  # the released image-space model must compute what the service computes on t
            gap = (service.eval()(nonmembers_morphed[:256]) - released.eval()(ctx.nonmembers.images[:256])).abs().max()
        g = secrets.geometry
        cr_params = conv.weight.numel() + (0 if conv.bias is None else conv.bias.numel())
        record.update(condition_number=secrets.condition, released_vs_service_max_logit_diff=float(gap),
                      first_layer=p.first_layer, geometry=g.describe(), first_conv=where.path,
                      permutation_compensated=compensated, service_init=service_init)
        return Target(
            model=released.eval(),
            initial_state=initial_state,
            training=record,
            utility={"accuracy": service_accuracy},
            costs={
                "train_time_s": record["train_time_s"],
                "train_time_per_epoch_s": record["train_time_s"] / max(p.epochs, 1),
                "setup_time_s": setup_s,
                "morph_time_per_image_s": morph_s / max(len(members), 1),
                "bytes_per_image_morphed": g.padded * 4,
                "bytes_per_image_plain_float32": g.channels * g.height * g.width * 4,
                "bytes_per_image_plain_uint8": g.channels * g.height * g.width,
                "cac_parameters": g.padded * g.features + g.out_channels,
                "cac_bytes": g.dense_bytes() + g.out_channels * 4,
                "cr_parameters": cr_params,
                "cr_bytes": cr_params * 4,
                "condition_number": secrets.condition,
            },
        )

    def _first_layer(self, ctx: FitContext) -> nn.Conv2d:
        """C_r as the provider set it (frozen: never trained, so the fresh model's, seeded or pretrained)."""
        return prepare_first_layer(ctx.build_model(), self.params, ctx.nonmembers.image_shape)

    def _service_at_round(self, target: Target, ctx: FitContext) -> tuple[MorphedService, Secrets, nn.Conv2d]:
        """The service network at ``ctx.config.gradient_round`` (train mode), the provider's secrets and C_r."""
        released = model_at_round(target, ctx.build_model, ctx.config.gradient_round)
        conv = self._first_layer(ctx)
        secrets = self.secrets(conv, ctx.nonmembers.image_shape, ctx.seeds["secrets"])
        body = service_body(released, find_first_conv(released, ctx.nonmembers.image_shape))
        return MorphedService(self.augmented(conv, secrets), body).train(), secrets, conv

    def observe(self, surface: Surface, target: Target, victim: Victim | None, ctx: FitContext) -> Observation:
        if surface not in (Surface.SHARED_DATA, Surface.GRADIENTS):
            return released_model_observation(surface, target, "mple")
        service, secrets, conv = self._service_at_round(target, ctx)
        morphed = self.morph(victim.images, secrets)
        geometry = secrets.geometry
        layer = MorphedLayer(
            dense=service.first.dense.clone(), bias=service.first.bias.clone(), feature_shape=geometry.feature_shape,
            image_shape=(geometry.channels, geometry.height, geometry.width), padding=geometry.padding,
            public_kernel=None if self.params.cr_secret else conv.weight.detach().clone(),
        )
        if surface is Surface.GRADIENTS:
            inputs = morphed.reshape(len(morphed), 1, 1, -1)
            gradients = client_gradients(service, inputs, victim.labels, ctx.config.bn_mode)
            observation = gradient_observation(
                service, gradients, victim, ctx, inputs=inputs, observer="outside eavesdropper on the service's training updates",
                input_space="morphed vectors t [1, 1, D]; the service model carries C_ac",
                c_r="secret" if self.params.cr_secret else "public",
                note="the service provider itself holds t: for it a gradient attack adds nothing to the mple-* attacks",
            )
            update = dataclasses.replace(observation.gradient_update, input_shape=(1, 1, geometry.padded), morphed=layer)
            return dataclasses.replace(observation, gradient_update=update)
        shared = SharedData(
            sent=morphed,
            labels=victim.labels.clone(),
            layer=layer,
            model=copy.deepcopy(service.rest).eval(),
            known_pairs=self._pair_source(ctx, secrets),
            corpus=None if ctx.members is None else self.morph(ctx.members.images, secrets),
        )
        return Observation(surface=surface, shared=shared, notes={
            "observer": "service provider", "cr_secret": self.params.cr_secret,
            "withheld": ["M", "channel permutation"] + (["C_r"] if self.params.cr_secret else []),
        })

    def audit_secrets(self, surface: Surface, target: Target, ctx: FitContext) -> dict[str, Any]:
        """M, M^-1 and the permutation from every surface; a secret C_r from the service's and the
        eavesdropper's (the released image-space model holds C_r by construction, its channels permuted)."""
        conv = self._first_layer(ctx)
        secrets = self.secrets(conv, ctx.nonmembers.image_shape, ctx.seeds["secrets"])
        out: dict[str, Any] = {"M": secrets.matrix, "M^-1": torch.linalg.inv(secrets.matrix),
                               "channel permutation": secrets.permutation}
        if self.params.cr_secret and surface in (Surface.SHARED_DATA, Surface.GRADIENTS):
            out["secret C_r"] = conv.weight.detach()
        return out

    def _pair_source(self, ctx: FitContext, secrets: Secrets):
        """n (original, morphed) pairs of the provider's other images (its nonmembers: disjoint from the victims).

        The pool is morphed up front so that the returned function holds no secret, only pairs.
        """
        generator = torch.Generator().manual_seed(derive_seed(ctx.seeds["observe"], "mple-known-pairs"))
        originals = ctx.nonmembers.images[torch.randperm(len(ctx.nonmembers), generator=generator)]
        morphed = self.morph(originals, secrets)

        def known_pairs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
            if n > len(originals):
                raise ConfigError(f"mple: {n} known pairs asked; the provider's other images number {len(originals)}")
            return originals[:n].clone(), morphed[:n].clone()

        return known_pairs

    def utility_twin(self) -> Defense:
        train = {f: getattr(self.params, f) for f in TrainParams.__dataclass_fields__}
        return FrozenFirstLayerTraining(FrozenFirstLayerParams(**train, first_layer=self.params.first_layer))


@dataclass(frozen=True)
class FrozenFirstLayerParams(TrainParams, FirstLayerParams):
    pass


class FrozenFirstLayerTraining(Defense):
    """The utility twin of ``mple``: plain training on images with the same frozen C_r (the fair control).

    Not registered: it exists so that ``accuracy_drop`` measures morphing, not the frozen first layer.
    """

    Params = FrozenFirstLayerParams
    description = "Plain training with MpLe's frozen first convolution (utility twin of mple)."

    def fit(self, model: nn.Module, members, ctx: FitContext) -> Target:
        prepare_first_layer(model, self.params, members.image_shape)
        target = fit_plainly(model, members, self.params, ctx, stage="train twin")
        target.costs["train_time_per_epoch_s"] = target.costs["train_time_s"] / max(self.params.epochs, 1)
        return target

    def observe(self, surface: Surface, target: Target, victim: Victim | None, ctx: FitContext) -> Observation:
        return released_model_observation(surface, target, "mple twin")

