"""GASCNN (Khowaja et al., IEEE JBHI 2023), built after PrivateSNN (Kim et al., AAAI 2022).

Stages (each timed, each cached on disk by the hash of everything that shaped it, see privbench.cache):
1. **Teacher**: a small ResNet trained on the members by the data owner.
2. **Synthesis**: a class-conditional generator trained against the frozen teacher's feature-map
   (BatchNorm) statistics and confident, balanced predictions; it yields a labelled synthetic set.
3. **Conversion**: BatchNorm folded, ReLU -> integrate-and-fire (snntorch Leaky, beta=1, reset by
   subtraction), thresholds balanced on the synthetic set only.
4. **Spike learning**: surrogate-gradient fine-tuning through time on the synthetic set only,
   distilling the teacher's outputs, at the release T and encoding.
Stages 2-4 never read the members.

Threat model. Real patient data touched the members split and, through stage 1, the teacher
only. The teacher is trained by the data owner and never leaves it: no surface exposes it (the
defense's trust assumption). MODEL_WHITEBOX / MODEL_QUERIES: the released SNN (stage 4), built
from synthetic images. GRADIENTS: an IoMT client fine-tunes the released SNN on its own real batch
by spike learning and shares the gradient of the SNN's cross-entropy, computed through the T steps
with the encoder (Poisson sampling passed straight through) and the surrogate spike gradient; the
attacker gets a copy of the SNN whose encoder draws its own samples. ``round=trained`` is the
released SNN; ``round=init`` the converted SNN before spike learning.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from torch import nn
from torch.nn import functional as F

from privbench import registry
from privbench.cache import cache_key, load_torch, save_torch, state_digest
from privbench.claims import GASCNN_CLAIMS
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
from privbench.defenses.gascnn.snn import (
    ENERGY_CONVENTION,
    PJ_PER_MAC,
    SpikeRecord,
    SpikingNetwork,
    ann_energy_breakdown_pj,
    ann_energy_pj,
    balanced_thresholds,
    neuron_count,
    spiking_twin,
    teacher_network,
)
from privbench.defenses.gascnn.synthesis import SynthesisParams, synthesize, train_generator
from privbench.deps import require
from privbench.params import bounded
from privbench.threat import Observation, Surface, Victim
from privbench.training import TrainParams, accuracy

PERCENTILE_CANDIDATES = (98.0, 99.0, 99.5, 99.9, 99.99, 100.0)

log = logging.getLogger(__name__)


# Settings that depend on the profile. ``quick`` (the default) gives a meaningful release in minutes on 2 cores:
# a shorter synthesis, one threshold percentile, one spike-learning epoch, no accuracy-vs-T curve. ``reference``
# is the paper-faithful setting the reference suite uses. Any of them can still be set explicitly.
PROFILES: dict[str, dict[str, Any]] = {
    "quick": {"synthesis_steps": 200, "synthetic_size": 1000, "timesteps": 16, "percentile": 99.9,
              "finetune_epochs": 1, "curve": "", "curve_images": 500},
    "reference": {"synthesis_steps": 800, "synthetic_size": 4000, "timesteps": 16, "percentile": 0.0,
                  "finetune_epochs": 2, "curve": "4,8,16,32,64", "curve_images": 500},
}


MAX_TIMESTEPS = 4096  # T of the SNN, and of each point of the accuracy-vs-T curve


@dataclass(frozen=True)
class GASCNNParams(TrainParams):
    """Teacher training (TrainParams), then synthesis, conversion and spike-learning settings.

    Fields left None take the value of ``profile`` (``PROFILES``); the resolved config stores every value.
    """

    profile: Literal["quick", "reference"] = "quick"
    synthesis_steps: int | None = bounded(None, ge=1, le=10**7)
    generator_width: int = bounded(32, ge=1, le=4096)
    synthetic_size: int | None = bounded(None, ge=10, le=10**7)
    validation_fraction: float = bounded(0.1, gt=0, lt=1)  # part of the synthetic set used to select the threshold percentile
    encoding: Literal["direct", "poisson"] = "direct"
    timesteps: int | None = bounded(None, ge=1, le=MAX_TIMESTEPS)  # T of spike learning and of the released SNN
    percentile: float | None = bounded(None, ge=0, le=100)  # threshold balancing percentile; 0: select from PERCENTILE_CANDIDATES (98..100) on the synthetic validation
    finetune_epochs: int | None = bounded(None, ge=0, le=100_000)
    finetune_lr: float = bounded(1e-4, gt=0, le=100)
    finetune_batch_size: int = bounded(64, ge=1, le=65_536)
    distill_temperature: float = bounded(4.0, gt=0, le=1e4)
    surrogate_slope: float = bounded(2.0, gt=0, le=1e4)  # atan surrogate steepness
    curve: str | None = None  # T values of the accuracy / energy curve ("" for none)
    curve_images: int | None = bounded(None, ge=0, le=10**9)  # nonmembers evaluated per curve point (0: all); the release accuracy uses all

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.profile not in PROFILES:
            raise ValueError(f"profile must be one of {sorted(PROFILES)}, got {self.profile!r}")
        for name, value in PROFILES[self.profile].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.timesteps < 1 or self.synthetic_size < 10 or not 0 < self.validation_fraction < 1:
            raise ValueError("timesteps >= 1, synthetic_size >= 10 and 0 < validation_fraction < 1 are required")
        if self.percentile and not 50 <= self.percentile <= 100:
            raise ValueError("percentile must be in [50, 100] (or 0 to select it)")
        try:
            _ = self.curve_timesteps
        except ValueError as exc:
            raise ValueError(f"curve must be comma-separated integers in [1, {MAX_TIMESTEPS}], got "
                             f"{self.curve!r}") from exc

    @property
    def curve_timesteps(self) -> list[int]:
        values = [int(v) for v in self.curve.split(",") if v.strip()]
        if any(not 1 <= v <= MAX_TIMESTEPS for v in values):
            raise ValueError(f"curve values must be in [1, {MAX_TIMESTEPS}]")
        return values

    def teacher(self) -> TrainParams:
        return TrainParams(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TrainParams)})


def stage_cache_path(identity: Mapping[str, Any]) -> Path:
    """``<home>/cache/gascnn/<cache_key("gascnn-stage", identity)>.pt``: where a stage output is stored."""
    from privbench.store import home

    return home() / "cache" / "gascnn" / f"{cache_key('gascnn-stage', identity)}.pt"


_warned_uncached = False


def _stage_cache(identity: Mapping[str, Any], compute: Callable[[], Any]) -> tuple[Any, bool]:
    """(stage output, whether it came from the cache): loaded from :func:`stage_cache_path` or computed and stored.

    ``identity`` names the stage and everything that shaped its output (see ``GASCNN._base_key``),
    including the data identity under ``"data"``; without one (a FitContext with no ``data_identity``)
    the output is computed and not cached. Outputs are tensors, dicts and lists of them and plain
    numbers and strings, so they load with ``weights_only=True``; an unreadable or unsafe file is a miss.
    """
    global _warned_uncached
    if not identity.get("data"):
        if not _warned_uncached:
            log.warning("gascnn: the fit context names no data identity, so stage outputs are not cached")
            _warned_uncached = True
        return compute(), False
    path = stage_cache_path(identity)
    value = load_torch(path)
    if value is not None:
        return value, True
    value = compute()
    try:
        save_torch(path, value)
    except OSError as exc:
        log.warning("could not write the gascnn stage cache %s (%s); continuing without it", path, exc)
    return value, False


def save_synthetic_grid(images: torch.Tensor, labels: torch.Tensor, classes: int, name: str,
                        per_class: int = 8) -> "Path":
    """A PNG with one column per class (up to ``per_class`` synthetic samples each), in the stage cache."""
    from privbench.artifacts import save_grid
    from privbench.store import home

    columns, titles = [], []
    for k in range(classes):
        picked = images[labels == k][:per_class]
        blank = torch.zeros(per_class - len(picked), *images.shape[1:])
        columns.append(torch.cat([picked, blank]))
        titles.append(f"class {k} (n={int((labels == k).sum())})")
    path = home() / "cache" / "gascnn" / f"{name}-grid.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_grid(path, columns, titles)
    return path


@torch.no_grad()
def snn_accuracy(snn: SpikingNetwork, images: torch.Tensor, labels: torch.Tensor, timesteps: int,
                 encoding: str, record: SpikeRecord | None = None, batch: int = 256) -> float:
    """Top-1 accuracy of the SNN at ``timesteps`` and ``encoding`` (the network's own settings restored)."""
    saved = snn.encoding, snn.record
    snn.encoding, snn.record = encoding, record
    snn.generator.manual_seed(0)
    correct = 0
    try:
        for begin in range(0, len(images), batch):
            logits = snn(images[begin : begin + batch], timesteps)
            correct += int((logits.argmax(1) == labels[begin : begin + batch]).sum())
    finally:
        snn.encoding, snn.record = saved
    return correct / max(len(images), 1)


def spike_learning(snn: SpikingNetwork, teacher: nn.Module, images: torch.Tensor, p: GASCNNParams,
                   seed: int, progress=None) -> dict:
    """Fine-tune ``snn`` in place through T steps (surrogate gradients) to match the teacher's softened outputs."""
    teacher = teacher.eval()
    with torch.no_grad():
        soft_targets = torch.cat([F.softmax(teacher(images[i : i + 256]) / p.distill_temperature, 1)
                                  for i in range(0, len(images), 256)])
    optimizer = torch.optim.Adam(snn.parameters(), lr=p.finetune_lr)
    rng = torch.Generator().manual_seed(seed)
    losses = []
    snn.train()
    if progress:
        progress(0, p.finetune_epochs)
    for epoch in range(p.finetune_epochs):
        order = torch.randperm(len(images), generator=rng)
        total = 0.0
        for begin in range(0, len(images), p.finetune_batch_size):
            idx = order[begin : begin + p.finetune_batch_size]
            logits = snn(images[idx])
            loss = F.kl_div(F.log_softmax(logits / p.distill_temperature, 1), soft_targets[idx],
                            reduction="batchmean") * p.distill_temperature**2
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / len(images))
        if progress:
            progress(epoch + 1, p.finetune_epochs)
    snn.eval()
    return {"epoch_losses": losses}


@registry.defenses.register("gascnn")
class GASCNN(Defense):
    """Teacher ResNet -> data-free synthetic set -> spiking ResNet, fine-tuned by spike learning (see module docs)."""

    Params = GASCNNParams
    description = (
        "GASCNN: ResNet teacher (data owner only, never exposed) -> generator on its feature-map statistics -> "
        "ResNet-to-SNN conversion and spike learning on synthetic data only. Released: the SNN. GRADIENTS: a "
        "client's spike-learning update of the SNN on its real batch."
    )
    protects = frozenset({Surface.GRADIENTS, Surface.MODEL_WHITEBOX, Surface.MODEL_QUERIES})
    models = ("resnet", "convnet")
    default_model = "resnet"
    models_reason = ("GASCNN converts a ReLU network whose pooling it can average into a spiking network (the "
                     "ResNet, or a sequential ReLU network such as convnet); lenet's sigmoids have no spiking equivalent")
    differentiable = True  # through the surrogate spike gradient and the straight-through encoder
    paper_claims = GASCNN_CLAIMS
    stochastic = True  # with encoding=poisson
    batchable_gradients = False  # a spiking network (stochastic encoder, snntorch state)
    tiny_params = {"epochs": 1, "batch_size": 16, "synthesis_steps": 3, "synthetic_size": 40, "timesteps": 4,
                   "finetune_epochs": 1, "curve": "", "percentile": 99.9}

    def __init__(self, params: GASCNNParams):
        require("snntorch", "the gascnn defense")
        super().__init__(params)

    def identity(self) -> dict[str, Any]:
        """The cached target carries its energy figures (costs): a change of ``ENERGY_CONVENTION`` is a new entry."""
        return {**super().identity(), "energy_convention": ENERGY_CONVENTION}

    # -- architecture ----------------------------------------------------------
    def released_architecture(self, model: nn.Module) -> nn.Module:
        teacher = self._check_model(model)
        return spiking_twin(teacher, [1.0] * neuron_count(teacher), self.params.timesteps, self.params.encoding,
                            self.params.surrogate_slope)

    @staticmethod
    def _check_model(model: nn.Module) -> nn.Module:
        """The teacher network for ``model`` (see ``teacher_network``); ConfigError saying why if it cannot spike."""
        try:
            return teacher_network(model)
        except ValueError as exc:
            raise ConfigError(f"gascnn cannot convert this model to a spiking network: {exc}. Use --model resnet "
                              f"or --model convnet.") from exc

    def utility_twin(self) -> Defense:
        from privbench.defenses.none import NoDefense, NoDefenseParams

        return NoDefense(NoDefenseParams(**dataclasses.asdict(self.params.teacher())))

    # -- stages ------------------------------------------------------------------
    def _base_key(self, model: nn.Module, members, ctx: FitContext) -> dict:
        """What shapes the teacher, and through it every later stage: the data (its identity and which
        images are the members), the model and its initial weights, the seeds, the teacher's recipe."""
        c = ctx.config
        return {"defense": "gascnn", "model": c.model, "model_params": dict(c.model_params),
                "data": dict(ctx.data_identity),
                "members": members.ids_digest(),
                "init_seed": ctx.seeds["init"], "train_seed": ctx.seeds["train"],
                "initial_weights": state_digest(model.state_dict()),
                "teacher": dataclasses.asdict(self.params.teacher())}

    def train_teacher(self, model: nn.Module, members, ctx: FitContext) -> tuple[nn.Module, dict, dict]:
        """Stage 1, the only stage that reads the members: (teacher, its training record, stage key)."""
        key = self._base_key(model, members, ctx)

        def compute():
            target = fit_plainly(model, members, self.params.teacher(), ctx, stage="teacher")
            return {"state": target.model.state_dict(), "training": target.training}

        out, cached = _stage_cache({"stage": "teacher", **key}, compute)
        model.load_state_dict(out["state"])
        return model.eval(), {**out["training"], "cached": cached}, key

    def fit(self, model: nn.Module, members, ctx: FitContext) -> Target:
        teacher = self._check_model(model)
        t0 = time.perf_counter()
        teacher, teacher_record, key = self.train_teacher(teacher, members, ctx)
        stage_times = {"teacher_s": time.perf_counter() - t0}
        return self.fit_from_teacher(teacher, teacher_record, key, ctx, stage_times)

    def fit_from_teacher(self, teacher: nn.Module, teacher_record: dict, key: dict, ctx: FitContext,
                         stage_times: dict) -> Target:
        """Stages 2-4 and the measurements; they read the teacher, synthetic data and nonmembers (utility) only."""
        p: GASCNNParams = self.params
        c = ctx.config
        seed = ctx.seeds["train"]
        classes = ctx.nonmembers.num_classes
        progress = (lambda stage: (lambda d, t: ctx.progress(stage, d, t))) if ctx.progress else (lambda stage: None)

        synthesis = SynthesisParams(steps=p.synthesis_steps, width=p.generator_width, synthetic_size=p.synthetic_size)
        key2 = {**key, "synthesis": dataclasses.asdict(synthesis)}

        def stage2():
            generator, record = train_generator(teacher, classes, c.channels, c.image_size, synthesis,
                                                derive_seed(seed, "gascnn-generator"), progress("synthesis"))
            images, labels, agreement = synthesize(generator, teacher, p.synthetic_size, classes,
                                                   derive_seed(seed, "gascnn-synthetic"))
            return {"images": images, "labels": labels, "record": {**record, "conditioned_agreement": agreement}}

        t0 = time.perf_counter()
        synthetic, cached2 = _stage_cache({"stage": "synthesis", **key2}, stage2)
        stage_times["synthesis_s"] = time.perf_counter() - t0
        images, labels = synthetic["images"], synthetic["labels"]
        grid = save_synthetic_grid(images, labels, classes, cache_key("gascnn-grid", key2))
        n_val = max(1, int(len(images) * p.validation_fraction))
        val_x, val_y, train_x = images[:n_val], labels[:n_val], images[n_val:]

        t0 = time.perf_counter()
        encoder_seed = derive_seed(seed, "gascnn-encoder")
        candidates = (p.percentile,) if p.percentile else PERCENTILE_CANDIDATES
        selection = {}
        tick = progress("conversion: threshold search")
        for done, percentile in enumerate(candidates):
            if tick:
                tick(done, len(candidates) + 1)
            snn = spiking_twin(teacher, balanced_thresholds(teacher, train_x, percentile), p.timesteps,
                                p.encoding, p.surrogate_slope, seed=encoder_seed)
            selection[percentile] = snn_accuracy(snn, val_x, val_y, p.timesteps, p.encoding)
        chosen = max(selection, key=lambda q: (selection[q], -abs(q - 99.9)))
        converted = spiking_twin(teacher, balanced_thresholds(teacher, train_x, chosen), p.timesteps, p.encoding,
                                  p.surrogate_slope, seed=encoder_seed)
        stage_times["conversion_s"] = time.perf_counter() - t0
        if tick:
            tick(len(candidates) + 1, len(candidates) + 1)

        key4 = {**key2, "percentile": chosen, "snn": {f: getattr(p, f) for f in (
            "validation_fraction", "encoding", "timesteps", "finetune_epochs", "finetune_lr", "finetune_batch_size",
            "distill_temperature", "surrogate_slope")}}

        def stage4():
            snn = copy.deepcopy(converted)
            record = spike_learning(snn, teacher, train_x, p, derive_seed(seed, "gascnn-finetune"),
                                    progress("spike learning"))
            return {"state": snn.state_dict(), "record": record}

        t0 = time.perf_counter()
        tuned, cached4 = _stage_cache({"stage": "spike-learning", **key4}, stage4)
        released = copy.deepcopy(converted)
        released.load_state_dict(tuned["state"])
        released.eval()
        stage_times["spike_learning_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        nonmembers = ctx.nonmembers
        teacher_accuracy = accuracy(teacher, nonmembers)
        evaluation = progress("evaluation: accuracy and energy")
        if evaluation:
            evaluation(0, 2)
        curve, energy = self._curve(teacher, converted, released, nonmembers, c)
        if evaluation:
            evaluation(1, 2)
        stage_times["evaluation_s"] = time.perf_counter() - t0
        release = SpikeRecord()  # the released SNN's operations, counted on the pass that measures its accuracy
        snn_acc = snn_accuracy(released, nonmembers.images, nonmembers.labels, p.timesteps, p.encoding, record=release)
        if evaluation:
            evaluation(2, 2)
        ann_pj, ann_ops = ann_energy_pj(teacher, nonmembers.image_shape)
        snn_pj, synaptic_pj = release.energy_pj(), release.synaptic_energy_pj()
        costs = {
            **{f"time_{k}": v for k, v in stage_times.items()},
            "train_time_s": sum(stage_times.values()),
            "teacher_accuracy": teacher_accuracy,
            "snn_accuracy": snn_acc,
            "accuracy_gap_teacher_minus_snn": teacher_accuracy - snn_acc,
            "energy_convention": ENERGY_CONVENTION,
            "ann_energy_pj": ann_pj,
            "ann_energy_pj_macs_only": ann_ops["macs"] * PJ_PER_MAC,
            "ann_macs": float(ann_ops["macs"]),
            "ann_operations": {k: float(v) for k, v in ann_ops.items()},
            "ann_energy_breakdown_pj": ann_energy_breakdown_pj(ann_ops),
            "snn_energy_pj": snn_pj,
            "snn_energy_pj_synaptic_only": synaptic_pj,
            "snn_operations": release.operations(),
            "snn_energy_breakdown_pj": release.energy_breakdown_pj(),
            "snn_energy_images": release.images,
            "energy_ratio_ann_over_snn": ann_pj / snn_pj if snn_pj else None,
            "energy_ratio_ann_over_snn_synaptic_only": ann_ops["macs"] * PJ_PER_MAC / synaptic_pj if synaptic_pj else None,
        }
        return Target(
            model=released,
            initial_state=copy.deepcopy(converted.state_dict()),
            training={
                "teacher": teacher_record, "synthesis": {**synthetic["record"], "cached": cached2},
                "synthetic_size": len(images), "validation_size": n_val,
                "percentile_selection": {str(k): v for k, v in selection.items()}, "percentile": chosen,
                "thresholds": converted.thresholds(), "spike_learning": {**tuned["record"], "cached": cached4},
                "accuracy_vs_T": curve, "energy_vs_T": energy, "stage_times_s": stage_times,
                "members_read_by": "teacher (stage 1) only",
                "artifact_files": {"synthetic_per_class.png": str(grid)},
            },
            utility={"accuracy": snn_acc},
            costs=costs,
        )

    def _curve(self, teacher, converted, released, nonmembers, c) -> tuple[dict, dict]:
        """Accuracy on nonmembers for each T and encoding, converted and fine-tuned; energy (with its breakdown)
        and spike rates of the fine-tuned SNN per inference (pJ), against the ANN's (``ENERGY_CONVENTION``)."""
        ann_pj, _ = ann_energy_pj(teacher, nonmembers.image_shape)
        curve: dict[str, dict[str, float]] = {}
        energy: dict[str, dict[str, Any]] = {}
        count = self.params.curve_images or len(nonmembers)
        x, y = nonmembers.images[:count], nonmembers.labels[:count]
        for encoding in ("direct", "poisson"):
            for steps in self.params.curve_timesteps:
                name = f"{encoding}/T={steps}"
                record = SpikeRecord()
                curve[name] = {
                    "converted": snn_accuracy(converted, x, y, steps, encoding),
                    "fine_tuned": snn_accuracy(released, x, y, steps, encoding, record=record),
                }
                snn_pj, ops = record.energy_pj(), record.operations()
                energy[name] = {"images": len(x), "snn_energy_pj": snn_pj, "ann_energy_pj": ann_pj,
                                "ratio_ann_over_snn": ann_pj / snn_pj if snn_pj else None,
                                "snn_energy_pj_synaptic_only": record.synaptic_energy_pj(),
                                "energy_breakdown_pj": record.energy_breakdown_pj(),
                                "operations_per_image": ops,
                                "spike_rates": record.spike_rates(),
                                "synaptic_ops_per_image": ops["synaptic_ops"],
                                "analog_macs_per_image": ops["first_layer_macs"]}
        return curve, energy

    # -- surfaces ----------------------------------------------------------------
    def observe(self, surface: Surface, target: Target, victim: Victim | None, ctx: FitContext) -> Observation:
        if surface is not Surface.GRADIENTS:
            return released_model_observation(surface, target, "gascnn")
        client, attacker_copy = (
            model_at_round(target, lambda: self.released_architecture(ctx.build_model()), ctx.config.gradient_round)
            for _ in range(2)
        )
        for model, purpose in ((client, "gascnn-client-encoder"), (attacker_copy, "gascnn-attacker-encoder")):
            model.generator.manual_seed(derive_seed(ctx.seeds["observe"], purpose))
        gradients = client_gradients(client, victim.images, victim.labels, ctx.config.bn_mode)
        return gradient_observation(
            attacker_copy, gradients, victim, ctx,
            mechanism=f"spike-learning update of the {'released' if ctx.config.gradient_round == 'trained' else 'converted'} "
                      f"SNN: CE through T={self.params.timesteps} steps, {self.params.encoding} encoding, atan surrogate",
            encoder="Poisson samples of the attacker's copy differ from the client's" if self.params.encoding == "poisson"
            else "direct (deterministic)",
        )
