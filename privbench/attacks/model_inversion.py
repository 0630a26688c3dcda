"""Model inversion: from the released classifier alone, reconstruct what a class of the private training data looks like.

Family ``model_inversion``; the output is one (or more) image per class with the class it represents, scored by
``privbench.metrics.score_inversion`` with an evaluation classifier the attack never saw. Presets:

- ``mi-face`` (Fredrikson et al. 2015, MODEL_WHITEBOX): gradient descent on 1 - p_class(x) (the class score)
  from a blank image, with a total-variation and an L2 prior, images kept in [0, 1]. ``restarts`` > 1 adds
  starts from seeded uniform noise; per class the start with the lowest final objective (the attacker's own)
  is kept.
- ``mi-face-art``: the same attack as ART implements it (``art.attacks.inference.model_inversion.MIFace`` on a
  ``PyTorchClassifier`` of the released model with a softmax head, so its cost is 1 - p_class as in the
  paper), a reference beside ours.
- ``deepinversion`` (Yin et al. 2020, MODEL_WHITEBOX): class cross-entropy plus the distance of every
  BatchNorm layer's batch statistics to its running statistics, TV and L2 priors, random jitter; a batch of
  ``per_class`` images per class is optimised jointly (the BatchNorm term needs a batch) and the one with the
  lowest class loss is kept. A model without BatchNorm running statistics (Opacus' GroupNorm, a spiking network
  with folded BatchNorm, a network without normalisation) is refused as unsupported, with the reason.
- ``gmi`` (Zhang et al. 2020, MODEL_WHITEBOX): a DCGAN-size GAN trained on the auxiliary split only (public
  data of the same kind, disjoint from the members), cached on disk by the auxiliary split's identity (its ids
  and pixels) and the GAN's settings; then per class latent codes optimised for the discriminator's realism
  plus ``id_weight`` x the class cross-entropy of the target; the code with the lowest final loss is kept.
- ``mi-face-snn`` / ``gmi-snn`` (adaptive, for ``gascnn``): the same attacks through the released spiking network
  run as a rate-coded ANN (each integrate-and-fire layer replaced by its rate: ReLU clipped at the layer's
  threshold, the folded weights unchanged), whose gradient is exact where the SNN's surrogate gradient is not;
  the final images are re-scored on the SNN itself to pick the restart. A model that is not a spiking network
  is refused (unsupported). The naive ``mi-face`` / ``gmi`` go through the surrogate gradient; a board shows
  both, so the stronger of the two is the one that counts.
- ``pred-decoder`` (Yang et al. 2019, MODEL_QUERIES, instance level): a decoder trained on the auxiliary split to
  map the target's prediction vectors (probabilities, top-k probabilities, logits or the label only) back to
  images, applied to the victims' prediction vectors the observation carries (one member per class; their
  images stay with the runner). Every auxiliary image it queries counts as one evaluation of the budget.

Gradient evaluations are counted per image: one forward and backward pass of one image through the target is one
evaluation (a step on a batch of B images costs B).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from privbench import cache, registry
from privbench.attacks.base import Attack, AttackOutput, Progress
from privbench.attacks.batchnorm_prior import batchnorm_layers, statistics_distance
from privbench.config import Budget
from privbench.deps import require
from privbench.params import bounded
from privbench.threat import AttackError, Observation, Surface, UnsupportedPair

log = logging.getLogger(__name__)


def _cache_root() -> Path:
    """Where attack-side models are cached: ``$PRIVBENCH_HOME/cache/model-inversion`` (as the runner's caches)."""
    return Path(os.environ.get("PRIVBENCH_HOME") or Path.cwd() / "runs") / "cache" / "model-inversion"


def _shape(observation: Observation) -> tuple[tuple[int, int, int], int]:
    aux = observation.auxiliary
    if aux is None or len(aux) == 0:
        raise AttackError("model inversion needs the auxiliary split for the image shape and classes; it is empty")
    return tuple(aux.image_shape), aux.num_classes


def _priors(x: torch.Tensor, tv_weight: float, l2_weight: float) -> torch.Tensor:
    """Per-image TV and L2 priors, [B] (TV: mean |dx| + mean |dy|; L2: mean squared pixel)."""
    tv = (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).mean(1) + (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).mean(1)
    return tv_weight * tv + l2_weight * x.pow(2).flatten(1).mean(1)


class ModelInversion(Attack):
    """Shared checks: the surface, the released model, the budget in per-image evaluations."""

    family = "model_inversion"
    surface = Surface.MODEL_WHITEBOX

    def _model(self, observation: Observation) -> nn.Module:
        if observation.surface is not self.surface:
            raise AttackError(f"{self.registry_name} inverts the released model on the {self.surface.value} surface, "
                              f"not {observation.surface.value}")
        if not isinstance(observation.model, nn.Module):
            raise AttackError(f"{self.registry_name} needs the released model (model_whitebox); the observation has none")
        model = observation.model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    @staticmethod
    def _steps(steps: int, batch: int, budget: Budget) -> int:
        """Optimisation steps on a batch of ``batch`` images within the budget (one evaluation per image and step)."""
        if budget.max_grad_evals is None:
            return steps
        if budget.max_grad_evals < batch:
            raise UnsupportedPair(f"a budget of {budget.max_grad_evals} gradient evaluations is below one step on the "
                                  f"{batch} images inverted together")
        return min(steps, budget.max_grad_evals // batch)

    @staticmethod
    def _restarts(restarts: int, classes: int, budget: Budget) -> int:
        """Restarts per class that leave the budget at least one step on all of them (at least 1)."""
        if budget.max_grad_evals is not None and budget.max_grad_evals < classes * restarts:
            return max(1, budget.max_grad_evals // classes)
        return restarts


# -- mi-face -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MIFaceParams:
    steps: int = bounded(500, ge=1, le=10**6)  # Adam steps per image
    lr: float = bounded(0.05, gt=0, le=100)
    tv_weight: float = bounded(0.05, ge=0, le=1e4)  # TV prior (mean |dx| + mean |dy|)
    l2_weight: float = bounded(0.0, ge=0, le=1e4)  # L2 prior (mean squared pixel)
    restarts: int = bounded(2, ge=1, le=1000)  # the first from the blank image, the others from seeded uniform noise
    blank: float = bounded(0.0, ge=0, le=1)  # the blank image's value
    start: Literal["blank", "noise"] = "blank"  # blank: the first start is the blank image; noise: every start is noise
    loss: Literal["one_minus_prob", "cross_entropy"] = "one_minus_prob"  # the class score's cost (paper: 1 - p)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.restarts < 1 or self.lr <= 0:
            raise ValueError("steps and restarts must be >= 1 and lr > 0")


def class_cost(logits: torch.Tensor, labels: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-image cost of the class score, [B]."""
    if loss == "one_minus_prob":
        return 1 - F.softmax(logits, 1).gather(1, labels[:, None]).squeeze(1)
    return F.cross_entropy(logits, labels, reduction="none")


def _best_per_class(objective: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[int]:
    """Index of the lowest objective for each class (the attacker's own selection)."""
    return [int(torch.nonzero(labels == k).flatten()[objective[labels == k].argmin()]) for k in range(num_classes)]


@registry.attacks.register("mi-face")
class MIFace(ModelInversion):
    """Fredrikson et al. 2015: gradient descent on 1 - p_class from a blank image with TV / L2 priors."""

    Params = MIFaceParams
    description = ("MI-Face (Fredrikson et al. 2015): gradient descent on the class score from a blank image, TV/L2 "
                   "prior; restarts chosen by the attack's own objective.")
    stochastic = True
    tiny_params = {"steps": 30, "restarts": 2}

    def _surrogate_and_judge(self, observation: Observation) -> tuple[nn.Module, nn.Module]:
        """(the network the images are optimised through, the released network that scores the restarts)."""
        model = self._model(observation)
        return model, model

    def run(self, observation: Observation, budget: Budget, progress: Progress | None = None) -> AttackOutput:
        model, judge = self._surrogate_and_judge(observation)
        (c, h, w), k = _shape(observation)
        p = self.params
        restarts = self._restarts(p.restarts, k, budget)
        labels = torch.arange(k).repeat(restarts)
        gen = torch.Generator().manual_seed(self.seed)
        x = torch.full((k * restarts, c, h, w), p.blank)
        first = k if p.start == "blank" else 0  # the images from seeded uniform noise
        if restarts * k > first:
            x[first:] = torch.rand((k * restarts - first, c, h, w), generator=gen)
        steps = self._steps(p.steps, len(x), budget)
        x.requires_grad_(True)
        opt = torch.optim.Adam([x], lr=p.lr)
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            cost = class_cost(model(x), labels, p.loss) + _priors(x, p.tv_weight, p.l2_weight)
            cost.sum().backward()
            opt.step()
            with torch.no_grad():
                x.clamp_(0, 1)
            if progress and (step % 20 == 0 or step == steps - 1):
                progress(step + 1, steps)
        with torch.no_grad():
            final = class_cost(judge(x), labels, p.loss) + _priors(x, p.tv_weight, p.l2_weight)
        best = _best_per_class(final, labels, k)
        return AttackOutput(
            images=x.detach()[best].clone(), labels=torch.arange(k), grad_evals=steps * len(x),
            info={"steps": steps, "restarts": restarts, "final_objective": [float(final[i]) for i in best],
                  "selection": "per class, the start with the lowest final objective (class cost + priors)"},
        )


# -- spiking networks run as rate-coded ANNs -------------------------------------------------------------------------


def _clip(threshold: float):
    return lambda x: x.clamp(0, threshold)


class RateCodedResNet(nn.Module):
    """A spiking ResNet (gascnn's, duck-typed: stem / lif_stem, blocks with conv1 / conv2 / shortcut / lif_a /
    lif_b, fc) as the ANN its firing rates approximate: every integrate-and-fire layer of threshold lam becomes
    clamp(x, 0, lam) (its graded spikes carry lam, so rate x lam is the clipped activation)."""

    def __init__(self, snn: nn.Module):
        super().__init__()
        self.snn = snn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        snn = self.snn
        s = _clip(float(snn.lif_stem.threshold))(snn.stem(x))
        for block in snn.blocks:
            h = _clip(float(block.lif_a.threshold))(block.conv1(s))
            residual = s if block.shortcut is None else block.shortcut(s)
            s = _clip(float(block.lif_b.threshold))(block.conv2(h) + residual)
        return snn.fc(F.adaptive_avg_pool2d(s, 1).flatten(1))


class RateCodedSequential(nn.Module):
    """A spiking sequential network (duck-typed: plan, layers, neurons, pools) as its rate-coded ANN."""

    def __init__(self, snn: nn.Module):
        super().__init__()
        self.snn = snn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        snn = self.snn
        for kind, index in snn.plan:
            if kind == "weight":
                x = snn.layers[index](x)
            elif kind == "fire":
                x = _clip(float(snn.neurons[index].threshold))(x)
            elif kind == "pool":
                x = snn.pools[index](x)
            else:
                x = x.flatten(1)
        return x


def rate_coded_ann(model: nn.Module) -> nn.Module:
    """The rate-coded ANN of a spiking network, or AttackError (unsupported) if ``model`` is not one."""
    if not hasattr(model, "timesteps"):
        raise UnsupportedPair(f"the released model ({type(model).__name__}) is not a spiking network: there is no "
                              f"rate-coded ANN to attack (use the naive attack)")
    if all(hasattr(model, a) for a in ("stem", "lif_stem", "blocks", "fc")):
        return RateCodedResNet(model).eval()
    if all(hasattr(model, a) for a in ("plan", "layers", "neurons", "pools")):
        return RateCodedSequential(model).eval()
    raise UnsupportedPair(f"no rate-coded equivalent is known for the spiking network {type(model).__name__}")


class _ThroughRateCodedANN:
    """Mixin of the adaptive presets: optimise through the rate-coded ANN, select restarts on the SNN itself."""

    adaptive_for = ("gascnn",)
    tiny_defense = "gascnn"

    def _surrogate_and_judge(self, observation: Observation) -> tuple[nn.Module, nn.Module]:
        snn = self._model(observation)
        return rate_coded_ann(snn), snn


# -- mi-face through ART -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MIFaceARTParams:
    max_iter: int = bounded(1000, ge=1, le=10**6)  # ART's max_iter
    window_length: int = bounded(100, ge=1, le=10**6)
    threshold: float = bounded(0.99, ge=0, le=1)
    learning_rate: float = bounded(0.1, gt=0, le=100)

    def __post_init__(self) -> None:
        if self.max_iter < 1 or self.learning_rate <= 0:
            raise ValueError("max_iter must be >= 1 and learning_rate > 0")


@registry.attacks.register("mi-face-art")
class MIFaceART(ModelInversion):
    """ART's MIFace on the same released model: the reference implementation beside ``mi-face``."""

    Params = MIFaceARTParams
    description = ("MI-Face as ART implements it (art.attacks.inference.model_inversion.MIFace on a PyTorchClassifier "
                   "with a softmax head), from the blank image; the reference beside mi-face.")
    tiny_params = {"max_iter": 20, "window_length": 5}

    def run(self, observation: Observation, budget: Budget, progress: Progress | None = None) -> AttackOutput:
        model = self._model(observation)
        require("art", "the mi-face-art attack (ART's MIFace)")
        from art.attacks.inference.model_inversion import MIFace as ARTMIFace
        from art.estimators.classification import PyTorchClassifier

        (c, h, w), k = _shape(observation)
        p = self.params
        max_iter = self._steps(p.max_iter, k, budget)
        classifier = PyTorchClassifier(nn.Sequential(model, nn.Softmax(dim=1)).eval(), loss=nn.NLLLoss(),
                                       input_shape=(c, h, w), nb_classes=k, clip_values=(0.0, 1.0),
                                       device_type="cpu")
        calls = [0]
        class_gradient = classifier.class_gradient

        def counted(x, label=None, **kwargs):  # one evaluation per image per class-gradient call
            calls[0] += len(x)
            return class_gradient(x, label=label, **kwargs)

        classifier.class_gradient = counted
        attack = ARTMIFace(classifier, max_iter=max_iter, window_length=min(p.window_length, max_iter),
                           threshold=float(p.threshold), learning_rate=float(p.learning_rate), batch_size=k,
                           verbose=False)
        start = time.perf_counter()
        images = attack.infer(None, np.arange(k))
        return AttackOutput(
            images=torch.from_numpy(np.asarray(images, dtype=np.float32)).clamp(0, 1), labels=torch.arange(k),
            grad_evals=calls[0],
            info={"implementation": "art.attacks.inference.model_inversion.MIFace", "max_iter": max_iter,
                  "time_s": time.perf_counter() - start},
        )


# -- DeepInversion -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeepInversionParams:
    steps: int = bounded(500, ge=1, le=10**6)
    lr: float = bounded(0.05, gt=0, le=100)
    per_class: int = bounded(4, ge=1, le=1000)  # images per class in the jointly optimised batch
    bn_weight: float = bounded(1.0, ge=0, le=1e6)  # weight of the BatchNorm statistics term
    tv_weight: float = bounded(0.05, ge=0, le=1e4)
    l2_weight: float = bounded(0.0, ge=0, le=1e4)
    jitter: int = bounded(2, ge=0, le=64)  # random shift of up to this many pixels per step (circular)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.per_class < 1 or self.lr <= 0:
            raise ValueError("steps and per_class must be >= 1 and lr > 0")


def _why_no_batchnorm(model: nn.Module) -> str:
    kinds = {type(m).__name__ for m in model.modules()}
    if "GroupNorm" in kinds:
        return "it normalises with GroupNorm (Opacus replaces BatchNorm), which keeps no running statistics"
    if hasattr(model, "timesteps"):
        return "it is a spiking network whose BatchNorm was folded into the weights at conversion"
    return "it has no BatchNorm layer"


@registry.attacks.register("deepinversion")
class DeepInversion(ModelInversion):
    """Yin et al. 2020: class loss + BatchNorm running-statistics matching + TV / L2 priors + jitter."""

    Params = DeepInversionParams
    description = ("DeepInversion (Yin et al. 2020): class cross-entropy, every BatchNorm layer's batch statistics "
                   "matched to its running statistics, TV/L2 priors, jitter; unsupported without BatchNorm statistics.")
    stochastic = True
    tiny_params = {"steps": 20, "per_class": 2}
    tiny_model = "resnet"

    def run(self, observation: Observation, budget: Budget, progress: Progress | None = None) -> AttackOutput:
        model = self._model(observation)
        layers = batchnorm_layers(model)
        if not layers:
            raise UnsupportedPair(f"deepinversion matches BatchNorm running statistics, and the released model "
                                  f"({type(model).__name__}) has none: {_why_no_batchnorm(model)}")
        (c, h, w), k = _shape(observation)
        p = self.params
        labels = torch.arange(k).repeat_interleave(p.per_class)
        gen = torch.Generator().manual_seed(self.seed)
        x = torch.rand((len(labels), c, h, w), generator=gen).requires_grad_(True)
        steps = self._steps(p.steps, len(x), budget)
        captured: list[torch.Tensor] = []

        def hook(module, inputs, _output):
            captured.append(statistics_distance(inputs[0], module.running_mean, module.running_var))

        handles = [m.register_forward_hook(hook) for m in layers]
        opt = torch.optim.Adam([x], lr=p.lr)
        try:
            for step in range(steps):
                opt.zero_grad(set_to_none=True)
                captured.clear()
                shifted = x
                if p.jitter:
                    dx, dy = (int(v) for v in torch.randint(-p.jitter, p.jitter + 1, (2,), generator=gen))
                    shifted = torch.roll(x, shifts=(dx, dy), dims=(2, 3))
                logits = model(shifted)
                loss = (F.cross_entropy(logits, labels) + p.bn_weight * sum(captured)
                        + _priors(x, p.tv_weight, p.l2_weight).mean())
                loss.backward()
                opt.step()
                with torch.no_grad():
                    x.clamp_(0, 1)
                if progress and (step % 20 == 0 or step == steps - 1):
                    progress(step + 1, steps)
            captured.clear()
            with torch.no_grad():
                final = F.cross_entropy(model(x), labels, reduction="none")
        finally:
            for handle in handles:
                handle.remove()
        best = _best_per_class(final, labels, k)
        return AttackOutput(
            images=x.detach()[best].clone(), labels=torch.arange(k), grad_evals=steps * len(x),
            info={"steps": steps, "batchnorm_layers": len(layers), "per_class": p.per_class,
                  "selection": "per class, the image of the batch with the lowest class cross-entropy"},
        )


# -- GMI -----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GMIParams:
    latent: int = bounded(64, ge=1, le=4096)  # GAN latent size
    width: int = bounded(32, ge=1, le=1024)  # DCGAN base width (generator's last / discriminator's first channels)
    gan_steps: int = bounded(2000, ge=1, le=10**7)  # GAN training steps on the auxiliary split
    gan_batch: int = bounded(64, ge=2, le=4096)
    gan_lr: float = bounded(2e-4, gt=0, le=1)
    gan_seed: int = bounded(0, ge=0, le=2**31 - 1)  # the GAN's own seed (one GAN serves every run on this data)
    steps: int = bounded(300, ge=1, le=10**6)  # latent optimisation steps
    lr: float = bounded(0.05, gt=0, le=100)
    restarts: int = bounded(4, ge=1, le=1000)  # latent codes per class; the lowest final loss is kept
    id_weight: float = bounded(100.0, ge=0, le=1e6)  # weight of the class cross-entropy beside the realism term

    def __post_init__(self) -> None:
        if self.steps < 1 or self.restarts < 1 or self.gan_steps < 1 or self.lr <= 0 or self.gan_lr <= 0:
            raise ValueError("steps, restarts and gan_steps must be >= 1; lr and gan_lr > 0")


def _upsamplings(size: int) -> int:
    n = int(round(math.log2(size))) - 2
    if n < 1 or 4 * 2**n != size:
        raise UnsupportedPair(f"gmi's DCGAN works on square images of a power-of-two side >= 8; got {size}")
    return n


class Generator(nn.Module):
    """DCGAN generator: z [B, latent] -> 4x4x(w*2^(n-1)) -> ... -> [B, C, S, S] in [0, 1] (sigmoid)."""

    def __init__(self, latent: int, width: int, channels: int, size: int):
        super().__init__()
        n = _upsamplings(size)
        top = width * 2 ** (n - 1)
        self.fc = nn.Sequential(nn.Linear(latent, top * 16), nn.BatchNorm1d(top * 16), nn.ReLU())
        self.top = top
        layers: list[nn.Module] = []
        c_in = top
        for i in range(n - 1):
            c_out = top // 2 ** (i + 1)
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
            c_in = c_out
        layers += [nn.ConvTranspose2d(c_in, channels, 4, 2, 1), nn.Sigmoid()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(self.fc(z).view(len(z), self.top, 4, 4))


class Discriminator(nn.Module):
    """DCGAN discriminator: [B, C, S, S] -> strided convs with LeakyReLU -> one logit (higher: real)."""

    def __init__(self, width: int, channels: int, size: int):
        super().__init__()
        n = _upsamplings(size)
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        c_in = width
        for _ in range(n - 1):
            layers += [nn.Conv2d(c_in, 2 * c_in, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * c_in), nn.LeakyReLU(0.2)]
            c_in *= 2
        self.net = nn.Sequential(*layers)
        self.out = nn.Linear(c_in * 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.net(x).flatten(1)).squeeze(1)


def auxiliary_identity(auxiliary) -> dict:
    """What names the auxiliary split for the GAN cache: its ids, its pixels and its shape."""
    pixels = hashlib.sha256(auxiliary.images.contiguous().numpy().tobytes()).hexdigest()
    return {"ids": auxiliary.ids_digest(), "pixels": pixels, "shape": list(auxiliary.images.shape)}


GAN_FIELDS = ("latent", "width", "gan_steps", "gan_batch", "gan_lr", "gan_seed")


def train_gan(auxiliary, params: GMIParams, cache_dir: Path | None = None, progress: Progress | None = None
              ) -> tuple[Generator, Discriminator, dict]:
    """The GAN prior of ``gmi``, trained on ``auxiliary`` (the only data it reads) or loaded from the cache.

    Non-saturating GAN loss, Adam (lr, betas 0.5 / 0.999), batches drawn with replacement by ``gan_seed``.
    Returns (generator, discriminator, info) with both networks in eval mode.
    """
    c, h, w = auxiliary.image_shape
    if h != w:
        raise UnsupportedPair(f"gmi's DCGAN works on square images; got {h}x{w}")
    settings = {name: getattr(params, name) for name in GAN_FIELDS}
    key = cache.cache_key("gmi-gan", {"auxiliary": auxiliary_identity(auxiliary), **settings})[:24]
    path = (cache_dir or _cache_root()) / f"gmi-gan-{key}.pt"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(params.gan_seed)
        gen, disc = Generator(params.latent, params.width, c, h), Discriminator(params.width, c, h)
    stored = cache.load_torch(path)
    if stored is not None:
        try:
            gen.load_state_dict(stored["generator"])
            disc.load_state_dict(stored["discriminator"])
            return gen.eval(), disc.eval(), {"cached": True, "cache_file": str(path), **settings,
                                             "train_time_s": float(stored["train_time_s"])}
        except Exception as exc:  # a file that does not fit the networks: a miss, retrained
            log.warning("gmi GAN cache %s does not fit the networks (%s); retraining", path, exc)
    images = auxiliary.images
    rng = torch.Generator().manual_seed(params.gan_seed)
    opt_g = torch.optim.Adam(gen.parameters(), lr=params.gan_lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=params.gan_lr, betas=(0.5, 0.999))
    gen.train(), disc.train()
    start = time.perf_counter()
    for step in range(params.gan_steps):
        real = images[torch.randint(0, len(images), (params.gan_batch,), generator=rng)]
        z = torch.randn((params.gan_batch, params.latent), generator=rng)
        fake = gen(z)
        opt_d.zero_grad(set_to_none=True)
        d_loss = F.softplus(-disc(real)).mean() + F.softplus(disc(fake.detach())).mean()
        d_loss.backward()
        opt_d.step()
        opt_g.zero_grad(set_to_none=True)
        g_loss = F.softplus(-disc(fake)).mean()
        g_loss.backward()
        opt_g.step()
        if progress and (step % 50 == 0 or step == params.gan_steps - 1):
            progress(step + 1, params.gan_steps)
    train_time = time.perf_counter() - start
    try:
        cache.save_torch(path, {"generator": gen.state_dict(), "discriminator": disc.state_dict(),
                                "train_time_s": torch.tensor(train_time)})
    except OSError as exc:
        log.warning("could not write the gmi GAN cache %s (%s); continuing without it", path, exc)
    return gen.eval(), disc.eval(), {"cached": False, "cache_file": str(path), **settings, "train_time_s": train_time,
                                     "trained_on": f"auxiliary split ({len(images)} images)"}


@registry.attacks.register("gmi")
class GMI(ModelInversion):
    """Zhang et al. 2020: a GAN prior from the auxiliary split, latent codes optimised for class and realism."""

    Params = GMIParams
    description = ("Generative model inversion (Zhang et al. 2020): a DCGAN trained on the auxiliary split only "
                   "(cached by its identity), latent optimisation of the class score plus the discriminator's realism.")
    stochastic = True
    tiny_params = {"gan_steps": 20, "gan_batch": 16, "width": 8, "latent": 16, "steps": 20, "restarts": 2}

    def _surrogate_and_judge(self, observation: Observation) -> tuple[nn.Module, nn.Module]:
        model = self._model(observation)
        return model, model

    def run(self, observation: Observation, budget: Budget, progress: Progress | None = None) -> AttackOutput:
        model, judge = self._surrogate_and_judge(observation)
        (_, _, _), k = _shape(observation)
        p = self.params
        gen, disc, gan_info = train_gan(observation.auxiliary, p)
        for net in (gen, disc):
            for q in net.parameters():
                q.requires_grad_(False)
        restarts = self._restarts(p.restarts, k, budget)
        labels = torch.arange(k).repeat(restarts)
        rng = torch.Generator().manual_seed(self.seed)
        z = torch.randn((len(labels), p.latent), generator=rng).requires_grad_(True)
        steps = self._steps(p.steps, len(z), budget)
        opt = torch.optim.Adam([z], lr=p.lr)

        def objective(images: torch.Tensor, net: nn.Module) -> torch.Tensor:
            return F.softplus(-disc(images)) + p.id_weight * F.cross_entropy(net(images), labels, reduction="none")

        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            objective(gen(z), model).sum().backward()
            opt.step()
            if progress and (step % 20 == 0 or step == steps - 1):
                progress(step + 1, steps)
        with torch.no_grad():
            images = gen(z)
            final = objective(images, judge)
        best = _best_per_class(final, labels, k)
        return AttackOutput(
            images=images[best].clamp(0, 1).clone(), labels=torch.arange(k), grad_evals=steps * len(z),
            info={"steps": steps, "restarts": restarts, "gan": gan_info,
                  "final_objective": [float(final[i]) for i in best],
                  "selection": "per class, the latent code with the lowest final objective (realism + id loss)"},
        )


@registry.attacks.register("mi-face-snn")
class MIFaceSNN(_ThroughRateCodedANN, MIFace):
    """mi-face through the released SNN's rate-coded ANN (adaptive for gascnn)."""

    description = ("mi-face adapted to spiking networks: gradients of the SNN run as its rate-coded ANN (clipped "
                   "ReLUs at the firing thresholds), restarts chosen on the SNN itself.")
    tiny_params = {"steps": 10, "restarts": 2, "start": "noise"}


@registry.attacks.register("gmi-snn")
class GMISNN(_ThroughRateCodedANN, GMI):
    """gmi through the released SNN's rate-coded ANN (adaptive for gascnn)."""

    description = ("gmi adapted to spiking networks: latent optimisation through the SNN run as its rate-coded ANN, "
                   "codes chosen on the SNN itself.")
    tiny_params = {**GMI.tiny_params, "steps": 10}


# -- prediction-vector decoder (black box) -------------------------------------------------------------------------


@dataclass(frozen=True)
class PredDecoderParams:
    output: Literal["probs", "logits", "label"] = "probs"  # what the query API returns
    top_k: int = bounded(0, ge=0, le=100_000)  # keep only the k largest probabilities (0: all)
    width: int = bounded(32, ge=1, le=1024)
    steps: int = bounded(1500, ge=1, le=10**7)  # decoder training steps
    batch: int = bounded(64, ge=1, le=4096)
    lr: float = bounded(1e-3, gt=0, le=1)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch < 1 or self.lr <= 0:
            raise ValueError("steps and batch must be >= 1 and lr > 0")


class Decoder(nn.Module):
    """Prediction vector [B, K] -> image [B, C, S, S] in [0, 1] (a DCGAN-style generator on the vector)."""

    def __init__(self, num_classes: int, width: int, channels: int, size: int):
        super().__init__()
        self.net = Generator(num_classes, width, channels, size)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.net(v)


def prediction_vector(logits: torch.Tensor, output: str, top_k: int) -> torch.Tensor:
    """What the query API returns, as the decoder's input: probabilities (optionally top-k), logits or one-hot."""
    k = logits.shape[1]
    if output == "label":
        return F.one_hot(logits.argmax(1), k).float()
    if output == "logits":
        return logits.float()
    probs = F.softmax(logits.float(), 1)
    if top_k and top_k < k:
        keep = probs.topk(top_k, 1).indices
        probs = torch.zeros_like(probs).scatter(1, keep, probs.gather(1, keep))
    return probs


@registry.attacks.register("pred-decoder")
class PredictionDecoder(ModelInversion):
    """Yang et al. 2019: an inversion decoder from prediction vectors to images, trained on the auxiliary split."""

    Params = PredDecoderParams
    description = ("Black-box inversion (Yang et al. 2019): a decoder trained on the auxiliary split's prediction "
                   "vectors, applied to the victims' prediction vectors (instance level); queries count as evaluations.")
    surface = Surface.MODEL_QUERIES
    stochastic = True
    tiny_params = {"steps": 20, "batch": 16, "width": 8}

    def run(self, observation: Observation, budget: Budget, progress: Progress | None = None) -> AttackOutput:
        if observation.surface is not Surface.MODEL_QUERIES or not callable(observation.query):
            raise AttackError(f"pred-decoder queries the released model (model_queries), not {observation.surface.value}")
        if observation.victim_outputs is None:
            raise AttackError("pred-decoder inverts victims' prediction vectors; the observation carries none")
        (c, h, w), k = _shape(observation)
        if h != w:
            raise UnsupportedPair(f"pred-decoder works on square images; got {h}x{w}")
        p = self.params
        aux = observation.auxiliary
        n = len(aux) if budget.max_grad_evals is None else min(len(aux), budget.max_grad_evals)
        order = torch.from_numpy(np.random.default_rng(self.seed).permutation(len(aux))[:n])
        images = aux.images[order]
        with torch.no_grad():
            logits = torch.cat([observation.query(images[i : i + 256]) for i in range(0, n, 256)])
        vectors = prediction_vector(logits, p.output, p.top_k)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            decoder = Decoder(k, p.width, c, h)
        rng = torch.Generator().manual_seed(self.seed)
        opt = torch.optim.Adam(decoder.parameters(), lr=p.lr)
        decoder.train()
        for step in range(p.steps):
            idx = torch.randint(0, n, (min(p.batch, n),), generator=rng)
            opt.zero_grad(set_to_none=True)
            F.mse_loss(decoder(vectors[idx]), images[idx]).backward()
            opt.step()
            if progress and (step % 50 == 0 or step == p.steps - 1):
                progress(step + 1, p.steps)
        decoder.eval()
        victims = prediction_vector(observation.victim_outputs, p.output, p.top_k)
        with torch.no_grad():
            out = decoder(victims).clamp(0, 1)
        return AttackOutput(
            images=out, labels=observation.victim_outputs.argmax(1).long(), grad_evals=n,
            info={"queried_images": n, "output": p.output, "top_k": p.top_k, "instance_level": True,
                  "labels": "the class the victim's prediction vector ranks first"},
        )
