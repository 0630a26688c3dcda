"""ResNet -> spiking ResNet conversion (Rueckauer et al. 2017 style) with snntorch integrate-and-fire
neurons, input encoders, and operation counting for the energy estimate (``ENERGY_CONVENTION``).

The SNN mirrors ``privbench.models.resnet.SmallResNet`` with BatchNorm folded into the
convolutions. Every ReLU becomes ``snntorch.Leaky(beta=1, reset_mechanism="subtract")`` (an
integrate-and-fire neuron) whose threshold is the layer's balanced activation scale ``lam``; its
spikes carry amplitude ``lam`` (snntorch's graded spikes), which is the same as scaling the next
layer's weights by ``lam``. The output layer integrates its input without spiking: logits are the
accumulated membrane potential divided by T.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from privbench.models.resnet import BasicBlock, SmallResNet

Encoding = Literal["poisson", "direct"]
PJ_PER_MAC = 4.6  # 45 nm, 32-bit float multiply-accumulate (Horowitz 2014: 3.7 mult + 0.9 add), as the paper uses
PJ_PER_AC = 0.9  # 45 nm, 32-bit float add (accumulate), Horowitz 2014

ENERGY_CONVENTION = (
    f"per inference (one image), 45 nm 32-bit float (Horowitz 2014): MAC {PJ_PER_MAC} pJ, add (AC) {PJ_PER_AC} pJ. "
    "SNN, summed over T steps: synaptic ops (input events x fan-out into every conv, shortcut conv, and the fc "
    "through average pooling) + membrane updates (1 AC per neuron per step, every integrate-and-fire layer and "
    "the K output integrators; the folded-BatchNorm bias enters here) + reset subtractions (1 AC per spike) + "
    "residual adds (1 AC per element of each block's sum per step, dense) at the AC cost; + first-layer MACs "
    "(stem conv x T) under direct encoding at the MAC cost. ANN: conv/fc MACs at the MAC cost + bias adds "
    "(folded BatchNorm and fc bias, 1 per output element) + residual adds (1 per element of each block's sum) + "
    "average-pooling adds (1 per pooled element) at the AC cost. Sequential networks (convnet): a pooled spike "
    "input carries the events of its window, each fanning out once. Not counted on either side: threshold "
    "comparisons / ReLU, the final division (by T, by the pooled area), the Poisson encoder's draws, memory "
    "access and data movement."
)


def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A convolution (with bias) computing ``bn(conv(x))`` in eval mode."""
    folded = copy.deepcopy(conv)
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(bn.running_mean)
    folded.weight = nn.Parameter(conv.weight.detach() * scale.reshape(-1, 1, 1, 1))
    folded.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias.detach())
    return folded


def _neuron(threshold: float, surrogate_slope: float) -> nn.Module:
    import snntorch
    from snntorch import surrogate

    return snntorch.Leaky(beta=1.0, threshold=threshold, reset_mechanism="subtract",
                          spike_grad=surrogate.atan(alpha=surrogate_slope), graded_spikes_factor=threshold)


@dataclass
class SpikeRecord:
    """Counts gathered over one forward pass of T steps, summed over the batch.

    ``synaptic_ops[layer]``: accumulate operations caused by input spikes (spikes x fan-out);
    ``analog_macs[layer]``: multiply-accumulates of layers fed analog values (direct encoding);
    ``membrane_updates[layer]``: one per neuron per step (integrate-and-fire layers and the output integrator);
    ``residual_adds[block]``: one per element of the block's sum (conv2 current + shortcut) per step;
    ``spikes[layer]`` / ``neurons[layer]``: output spikes and neuron count, for spike rates (each spike also
    costs one reset subtraction). ``ENERGY_CONVENTION`` states what the energy counts.
    """

    synaptic_ops: dict[str, float] = field(default_factory=dict)
    analog_macs: dict[str, float] = field(default_factory=dict)
    membrane_updates: dict[str, float] = field(default_factory=dict)
    residual_adds: dict[str, float] = field(default_factory=dict)
    spikes: dict[str, float] = field(default_factory=dict)
    neurons: dict[str, int] = field(default_factory=dict)
    images: int = 0
    steps: int = 0

    def add(self, table: dict, key: str, value: float) -> None:
        table[key] = table.get(key, 0.0) + float(value)

    def spike_rates(self) -> dict[str, float]:
        """Mean spikes per neuron per time step, per layer."""
        return {k: self.spikes[k] / max(self.neurons[k] * self.images * self.steps, 1) for k in self.spikes}

    def operations(self) -> dict[str, float]:
        """Operations of one inference (per image), by kind."""
        n = max(self.images, 1)
        return {
            "synaptic_ops": sum(self.synaptic_ops.values()) / n,
            "membrane_updates": sum(self.membrane_updates.values()) / n,
            "reset_subtractions": sum(self.spikes.values()) / n,
            "residual_adds": sum(self.residual_adds.values()) / n,
            "first_layer_macs": sum(self.analog_macs.values()) / n,
        }

    def energy_breakdown_pj(self) -> dict[str, float]:
        """Energy of one inference (per image) by kind of operation, in pJ."""
        return {kind: count * (PJ_PER_MAC if kind == "first_layer_macs" else PJ_PER_AC)
                for kind, count in self.operations().items()}

    def energy_pj(self) -> float:
        """Energy of one inference (per image), in pJ, every counted operation (see ``ENERGY_CONVENTION``)."""
        return sum(self.energy_breakdown_pj().values())

    def synaptic_energy_pj(self) -> float:
        """The synaptic-operation convention alone (synaptic ops + first-layer MACs, per image, pJ): what
        SNN energy estimates usually report, without membrane updates, resets and residual adds."""
        parts = self.energy_breakdown_pj()
        return parts["synaptic_ops"] + parts["first_layer_macs"]


def fan_out_ops(layer: nn.Module, spikes: torch.Tensor) -> float:
    """Exact synaptic operations of ``layer`` driven by binary events ``spikes`` (any amplitude):
    each nonzero input element adds into every output it is connected to."""
    return weighted_fan_out(layer, (spikes != 0).to(torch.float32))


def weighted_fan_out(layer: nn.Module, events: torch.Tensor) -> float:
    """Synaptic operations of ``layer`` when input position i carries ``events[i]`` events (e.g. the spikes an
    average-pooling window gathered into one input of ``layer``): each event adds into every connected output."""
    if isinstance(layer, nn.Conv2d):
        ones = torch.ones(layer.out_channels, layer.in_channels // layer.groups, *layer.kernel_size)
        return float(F.conv2d(events, ones, stride=layer.stride, padding=layer.padding, groups=layer.groups).sum())
    if isinstance(layer, nn.Linear):
        return float(events.sum() * layer.out_features)
    raise TypeError(f"no synaptic-op rule for {type(layer).__name__}")


def macs(layer: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one image through ``layer`` (conventional count: outputs x fan-in)."""
    if isinstance(layer, nn.Conv2d):
        out = F.conv2d(torch.zeros(1, *input_shape), layer.weight, stride=layer.stride, padding=layer.padding,
                       groups=layer.groups)
        fan_in = (layer.in_channels // layer.groups) * layer.kernel_size[0] * layer.kernel_size[1]
        return int(out.numel() * fan_in)
    if isinstance(layer, nn.Linear):
        return layer.in_features * layer.out_features
    raise TypeError(f"no MAC rule for {type(layer).__name__}")


class SpikingBlock(nn.Module):
    def __init__(self, block: BasicBlock, lam_a: float, lam_b: float, slope: float):
        super().__init__()
        self.conv1 = fold_bn(block.conv1, block.bn1)
        self.conv2 = fold_bn(block.conv2, block.bn2)
        self.shortcut = fold_bn(block.shortcut[0], block.shortcut[1]) if len(block.shortcut) else None
        self.lif_a, self.lif_b = _neuron(lam_a, slope), _neuron(lam_b, slope)


class SpikingNetwork(nn.Module):
    """What every spiking twin shares: the input encoder, integrate-and-fire with operation counting."""

    timesteps: int
    encoding: Encoding
    initial_membrane: float
    generator: torch.Generator
    record: "SpikeRecord | None"

    def _start(self, images: torch.Tensor, timesteps: int | None) -> int:
        """The number of steps of this pass (``timesteps`` or the network's own); registers it with the record."""
        steps = timesteps or self.timesteps
        if self.record is not None:
            self.record.images += len(images)
            self.record.steps = steps
        return steps

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if self.encoding == "direct":
            return images
        draws = torch.rand(images.shape, generator=self.generator, dtype=images.dtype)
        spikes = (draws < images.clamp(0, 1)).to(images.dtype)
        return spikes + images - images.detach()  # straight-through: forward spikes, backward d/dx = 1

    def _count(self, name: str, layer: nn.Module, inputs: torch.Tensor, analog: bool = False) -> None:
        if self.record is None:
            return
        if analog:
            self.record.add(self.record.analog_macs, name, macs(layer, tuple(inputs.shape[1:])) * len(inputs))
        else:
            self.record.add(self.record.synaptic_ops, name, fan_out_ops(layer, inputs.detach()))

    def _fire(self, name: str, lif: nn.Module, current: torch.Tensor, mem: dict) -> torch.Tensor:
        if name not in mem:
            mem[name] = torch.full_like(current, float(lif.threshold) * self.initial_membrane)
        spikes, mem[name] = lif(current, mem[name])
        if self.record is not None:
            self.record.add(self.record.spikes, name, (spikes.detach() != 0).sum())
            self.record.add(self.record.membrane_updates, name, current.numel())
            self.record.neurons[name] = int(current[0].numel())
        return spikes


class SpikingResNet(SpikingNetwork):
    """Spiking twin of ``SmallResNet``: input [B, C, S, S] in [0, 1] -> logits [B, K] after T steps.

    ``encoding``: ``poisson`` (each step a Bernoulli spike per pixel with probability = intensity;
    the sampling passes gradients straight through, d spike / d intensity = 1, the derivative of its
    expectation) or ``direct`` (the analog image into the first layer at every step). ``generator``
    seeds the Poisson sampling; ``record`` (if set) receives operation counts.
    """

    def __init__(self, ann: SmallResNet, thresholds: list[float], timesteps: int, encoding: Encoding,
                 surrogate_slope: float = 2.0, seed: int = 0, initial_membrane: float = 0.5):
        super().__init__()
        # Membranes start at this fraction of the threshold: 0.5 turns the spike count into a rounding of
        # the activation instead of a floor, halving the expected conversion error (Bu et al., ICLR 2022).
        self.initial_membrane = initial_membrane
        ann = copy.deepcopy(ann).eval()
        self.stem = fold_bn(ann.stem[0], ann.stem[1])
        self.lif_stem = _neuron(thresholds[0], surrogate_slope)
        self.blocks = nn.ModuleList(
            SpikingBlock(b, thresholds[1 + 2 * i], thresholds[2 + 2 * i], surrogate_slope)
            for i, b in enumerate(ann.blocks)
        )
        self.fc = copy.deepcopy(ann.fc)
        self.timesteps, self.encoding = timesteps, encoding
        self.generator = torch.Generator().manual_seed(seed)
        self.record: SpikeRecord | None = None

    def thresholds(self) -> list[float]:
        out = [float(self.lif_stem.threshold)]
        for b in self.blocks:
            out += [float(b.lif_a.threshold), float(b.lif_b.threshold)]
        return out

    def forward(self, images: torch.Tensor, timesteps: int | None = None) -> torch.Tensor:
        steps = self._start(images, timesteps)
        mem: dict[str, torch.Tensor] = {}
        total = 0.0
        for _ in range(steps):
            x = self.encode(images)
            self._count("stem", self.stem, x, analog=self.encoding == "direct")
            s = self._fire("stem", self.lif_stem, self.stem(x), mem)
            for i, block in enumerate(self.blocks):
                self._count(f"block{i}.conv1", block.conv1, s)
                h = self._fire(f"block{i}.a", block.lif_a, block.conv1(s), mem)
                self._count(f"block{i}.conv2", block.conv2, h)
                residual = s
                if block.shortcut is not None:
                    self._count(f"block{i}.shortcut", block.shortcut, s)
                    residual = block.shortcut(s)
                if self.record is not None:  # the block's sum: one add per element
                    self.record.add(self.record.residual_adds, f"block{i}", residual.numel())
                s = self._fire(f"block{i}.b", block.lif_b, block.conv2(h) + residual, mem)
            pooled = F.adaptive_avg_pool2d(s, 1).flatten(1)
            if self.record is not None:  # average pooling then fc: each spike reaches the K outputs once
                self.record.add(self.record.synaptic_ops, "fc", float((s.detach() != 0).sum()) * self.fc.out_features)
                self.record.add(self.record.membrane_updates, "fc", len(s) * self.fc.out_features)  # K integrators
            total = total + self.fc(pooled)
        return total / steps


class SpikingSequential(SpikingNetwork):
    """Spiking twin of a sequential ReLU network (``teacher_network`` of e.g. convnet): input [B, C, S, S] in
    [0, 1] -> logits [B, K] after T steps.

    Conv2d / Linear (BatchNorm folded) feed integrate-and-fire neurons where the ANN has a ReLU; average
    pooling and flattening act on the spikes (a pooled input carries the events of its window, counted as
    such); the last layer integrates without spiking (logits = accumulated potential / T).
    """

    def __init__(self, ann: nn.Sequential, thresholds: list[float], timesteps: int, encoding: Encoding,
                 surrogate_slope: float = 2.0, seed: int = 0, initial_membrane: float = 0.5):
        super().__init__()
        self.initial_membrane = initial_membrane
        modules = list(copy.deepcopy(ann).eval())
        self.layers, self.neurons, self.pools = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        self.plan: list[tuple[str, int]] = []
        i = 0
        while i < len(modules):
            module = modules[i]
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                if i + 1 < len(modules) and isinstance(modules[i + 1], nn.BatchNorm2d):
                    module, i = fold_bn(module, modules[i + 1]), i + 1
                self.layers.append(module)
                self.plan.append(("weight", len(self.layers) - 1))
            elif isinstance(module, nn.ReLU):
                self.neurons.append(_neuron(thresholds[len(self.neurons)], surrogate_slope))
                self.plan.append(("fire", len(self.neurons) - 1))
            elif isinstance(module, nn.AvgPool2d):
                self.pools.append(module)
                self.plan.append(("pool", len(self.pools) - 1))
            elif isinstance(module, nn.Flatten):
                self.plan.append(("flatten", 0))
            else:
                raise ValueError(f"no spiking equivalent for {type(module).__name__} (convert Conv2d, Linear, "
                                 f"BatchNorm2d, ReLU, AvgPool2d and Flatten)")
            i += 1
        if not self.plan or self.plan[-1][0] != "weight":
            raise ValueError("the network must end with a Conv2d or Linear layer (the output integrators)")
        self.timesteps, self.encoding = timesteps, encoding
        self.generator = torch.Generator().manual_seed(seed)
        self.record = None

    def thresholds(self) -> list[float]:
        return [float(n.threshold) for n in self.neurons]

    def forward(self, images: torch.Tensor, timesteps: int | None = None) -> torch.Tensor:
        steps = self._start(images, timesteps)
        mem: dict[str, torch.Tensor] = {}
        total = 0.0
        last = len(self.plan) - 1
        for _ in range(steps):
            x = self.encode(images)
            events = None if self.encoding == "direct" else (x.detach() != 0).float()  # None: analog input
            current = x
            for position, (kind, index) in enumerate(self.plan):
                if kind == "weight":
                    layer = self.layers[index]
                    if self.record is not None:
                        if events is None:
                            self.record.add(self.record.analog_macs, f"layer{index}",
                                            macs(layer, tuple(x.shape[1:])) * len(x))
                        else:
                            self.record.add(self.record.synaptic_ops, f"layer{index}", weighted_fan_out(layer, events))
                    current = layer(x)
                    if position == last:
                        if self.record is not None:  # the output integrators: one add per class per step
                            self.record.add(self.record.membrane_updates, "output", current.numel())
                        total = total + current
                elif kind == "fire":
                    x = self._fire(f"neuron{index}", self.neurons[index], current, mem)
                    events = (x.detach() != 0).float()
                elif kind == "pool":
                    pool = self.pools[index]
                    x = pool(x)
                    area = pool.kernel_size * pool.kernel_size if isinstance(pool.kernel_size, int) else \
                        pool.kernel_size[0] * pool.kernel_size[1]
                    events = None if events is None else pool(events) * area
                else:
                    x = x.flatten(1)
                    events = None if events is None else events.flatten(1)
        return total / steps


def teacher_network(model: nn.Module) -> nn.Module:
    """The ANN GASCNN trains as its teacher for ``model``: a ``SmallResNet`` as it is; a sequential ReLU network
    with BatchNorm after every convolution (feature-map statistics for synthesis; folded at conversion) and
    average pooling in place of max pooling (which has no exact spiking equivalent). Initial weights are
    ``model``'s. Raises ValueError for other networks (sigmoid or unpooled ones, say) with the reason."""
    if isinstance(model, SmallResNet):
        return model
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"{type(model).__name__} is neither a ResNet nor a sequential network")
    modules = list(model)
    out: list[nn.Module] = []
    for i, module in enumerate(modules):
        if isinstance(module, nn.MaxPool2d):
            out.append(nn.AvgPool2d(module.kernel_size, module.stride, module.padding))
            continue
        if not isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.ReLU, nn.AvgPool2d, nn.Flatten)):
            raise ValueError(f"its layer {i} is a {type(module).__name__}: spiking conversion needs ReLU activations "
                             f"and pooling by averaging (Conv2d, Linear, BatchNorm2d, ReLU, Max/AvgPool2d, Flatten)")
        out.append(module)
        followed_by_bn = i + 1 < len(modules) and isinstance(modules[i + 1], nn.BatchNorm2d)
        if isinstance(module, nn.Conv2d) and not followed_by_bn:
            out.append(nn.BatchNorm2d(module.out_channels))
    return nn.Sequential(*out)


def spiking_twin(teacher: nn.Module, thresholds: list[float], timesteps: int, encoding: Encoding,
                 surrogate_slope: float = 2.0, seed: int = 0) -> SpikingNetwork:
    """The spiking network converted from ``teacher`` (a ``teacher_network``) with these thresholds."""
    cls = SpikingResNet if isinstance(teacher, SmallResNet) else SpikingSequential
    return cls(teacher, thresholds, timesteps, encoding, surrogate_slope, seed=seed)


def neuron_count(teacher: nn.Module) -> int:
    """Integrate-and-fire layers of the spiking twin of ``teacher`` (one threshold each)."""
    if isinstance(teacher, SmallResNet):
        return 1 + 2 * len(teacher.blocks)
    return sum(isinstance(m, nn.ReLU) for m in teacher)


def ann_activation_layers(ann: SmallResNet) -> list[str]:
    """Names of the ReLU outputs the thresholds balance, in SNN order."""
    names = ["stem"]
    for i in range(len(ann.blocks)):
        names += [f"block{i}.a", f"block{i}.b"]
    return names


@torch.no_grad()
def ann_activations(ann: SmallResNet, images: torch.Tensor, batch: int = 256) -> list[torch.Tensor]:
    """Every ReLU output of the ANN on ``images`` (flattened per layer), in SNN order."""
    ann = ann.eval()
    per_layer: list[list[torch.Tensor]] = [[] for _ in ann_activation_layers(ann)]
    for begin in range(0, len(images), batch):
        x = ann.stem(images[begin : begin + batch])
        per_layer[0].append(x.flatten())
        for i, block in enumerate(ann.blocks):
            a = F.relu(block.bn1(block.conv1(x)))
            x = F.relu(block.bn2(block.conv2(a)) + block.shortcut(x))
            per_layer[1 + 2 * i].append(a.flatten())
            per_layer[2 + 2 * i].append(x.flatten())
    return [torch.cat(chunks) for chunks in per_layer]


@torch.no_grad()
def relu_outputs(ann: nn.Sequential, images: torch.Tensor, batch: int = 256) -> list[torch.Tensor]:
    """Every ReLU output of a sequential ANN on ``images`` (flattened per layer), in order."""
    relus = [m for m in ann if isinstance(m, nn.ReLU)]
    per_layer: list[list[torch.Tensor]] = [[] for _ in relus]
    hooks = [m.register_forward_hook(lambda mod, inp, out, k=k: per_layer[k].append(out.flatten()))
             for k, m in enumerate(relus)]
    try:
        ann.eval()
        for begin in range(0, len(images), batch):
            ann(images[begin : begin + batch])
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(chunks) for chunks in per_layer]


def balanced_thresholds(ann: nn.Module, images: torch.Tensor, percentile: float) -> list[float]:
    """Per layer, the ``percentile`` of its positive activations on ``images`` (robust normalisation)."""
    out = []
    for acts in (ann_activations(ann, images) if isinstance(ann, SmallResNet) else relu_outputs(ann, images)):
        positive = acts[acts > 0]
        if len(positive) == 0:
            out.append(1.0)
            continue
        sample = positive[torch.randperm(len(positive), generator=torch.Generator().manual_seed(0))[:2_000_000]]
        out.append(max(float(torch.quantile(sample, percentile / 100.0)), 1e-6))
    return out


def ann_operations(ann: nn.Module, input_shape: tuple[int, int, int]) -> dict[str, int]:
    """Operations of one ANN inference, by kind (see ``ENERGY_CONVENTION``): conv/linear MACs; bias adds
    (each BatchNorm output, folded into its conv, and each biased linear output); residual adds (each
    element of a block's sum); average-pooling adds (each element of the pooled feature map)."""
    counts = {"macs": 0, "bias_adds": 0, "residual_adds": 0, "pooling_adds": 0}
    members = list(ann) if isinstance(ann, nn.Sequential) else []
    before_bn = {id(m) for m, nxt in zip(members, members[1:], strict=False) if isinstance(nxt, nn.BatchNorm2d)}

    def hook(module, inputs, output):
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            counts["macs"] += macs(module, tuple(inputs[0].shape[1:]))
        biased = isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None and id(module) not in before_bn
        if isinstance(module, nn.BatchNorm2d) or biased:  # a conv's bias folds into the BatchNorm after it
            counts["bias_adds"] += output[0].numel()
        if isinstance(module, BasicBlock):  # the last block's output is the map average pooling sums
            counts["residual_adds"] += output[0].numel()
            counts["pooling_adds"] = output[0].numel()
        if isinstance(module, nn.AvgPool2d):  # one add per element pooled
            counts["pooling_adds"] += inputs[0][0].numel()

    hooks = [m.register_forward_hook(hook) for m in ann.modules()
             if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d, BasicBlock, nn.AvgPool2d))]
    was_training = ann.training
    try:
        with torch.no_grad():
            ann.eval()(torch.zeros(1, *input_shape))
    finally:
        for h in hooks:
            h.remove()
        ann.train(was_training)
    return counts


def ann_energy_breakdown_pj(counts: dict[str, int]) -> dict[str, float]:
    """Energy (pJ) of one ANN inference by kind, from ``ann_operations``: MACs at 4.6 pJ, adds at 0.9 pJ."""
    return {kind: n * (PJ_PER_MAC if kind == "macs" else PJ_PER_AC) for kind, n in counts.items()}


def ann_energy_pj(ann: nn.Module, input_shape: tuple[int, int, int]) -> tuple[float, dict[str, int]]:
    """Energy (pJ) of one ANN inference, every counted operation, and the operation counts by kind."""
    counts = ann_operations(ann, input_shape)
    return sum(ann_energy_breakdown_pj(counts).values()), counts
