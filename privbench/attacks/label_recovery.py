"""Recovering the victim batch's labels from the shared update, before any image is optimised.

Three rules, each computable from what a GRADIENTS observation holds:

- ``analytic`` (iDLG, Zhao et al. 2020): for one image, the true class is the row of the last
  layer's weight gradient with a negative sum. Exact for B = 1 with non-negative features.
- ``count`` (Geng et al. 2021, "Towards general deep leakage in federated learning"; breaching's
  bias-corrected rule in spirit): the last layer's bias gradient of a mean cross-entropy is
  db_k = mean_i p_ik - n_k / B, so the class counts are n_k = B (p_k - db_k), with the batch's mean
  softmax p_k estimated on the attacker's own inputs (the auxiliary split). Without a bias, the weight
  gradient's row sums play its part: s_k = (1/B) sum_i (p_ik - y_ik) S_i with S_i the feature sum, so
  n_k = B (E[p_k S] - s_k) / E[S]. Counts are rounded to sum to B (largest remainder). Handles
  repeated labels.
- ``yin`` (Yin et al. 2021, "See through gradients"): the B classes whose weight-gradient rows have
  the most negative minimum. Assumes the B labels are distinct (B <= K).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from privbench.threat import AttackError, GradientUpdate


@dataclass(frozen=True)
class LastLayer:
    """The classifier's final linear layer and where its gradients sit in ``update.gradients``."""

    module: nn.Linear
    weight_index: int
    bias_index: int | None


def last_layer(update: GradientUpdate) -> LastLayer:
    """The last ``nn.Linear`` with one output per class in ``update.model``.

    Raises:
        AttackError: the model has no such layer (the rules below need it).
    """
    params = [q for q in update.model.parameters() if q.requires_grad]
    linears = [m for m in update.model.modules() if isinstance(m, nn.Linear) and m.out_features == update.num_classes]
    if not linears:
        raise AttackError("label recovery needs a final linear layer with one output per class; the model has none")
    layer = linears[-1]
    index = {id(q): i for i, q in enumerate(params)}
    if id(layer.weight) not in index:
        raise AttackError("the final linear layer's weight is frozen: the update holds no gradient for it")
    bias = index.get(id(layer.bias)) if layer.bias is not None else None
    return LastLayer(layer, index[id(layer.weight)], bias)


def analytic_label(update: GradientUpdate) -> torch.Tensor:
    """iDLG: for one image, the class whose last-layer weight-gradient row has a negative sum. int64 [1].

    d(CE)/dW_k = (p_k - y_k) h with h >= 0, so only the true class's row is non-positive.
    """
    if update.batch_size != 1:
        raise AttackError(f"the analytic (iDLG) label rule holds for one image only; batch size is {update.batch_size}")
    for grad in reversed(update.gradients):
        if grad.dim() == 2 and grad.shape[0] == update.num_classes:
            return grad.sum(dim=1).argmin().reshape(1)
    raise AttackError("no final linear layer with one row per class found for the analytic label rule")


def yin_labels(update: GradientUpdate, gradients: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Yin et al.: the B classes with the most negative minimum over their weight-gradient row. int64 [B]."""
    if update.batch_size > update.num_classes:
        raise AttackError(f"Yin's label rule assumes distinct labels: batch size {update.batch_size} exceeds "
                          f"{update.num_classes} classes; use label=count")
    weight = gradients[last_layer(update).weight_index]
    return weight.min(dim=1).values.argsort()[: update.batch_size].sort().values


def count_labels(update: GradientUpdate, gradients: tuple[torch.Tensor, ...], probe_inputs: torch.Tensor) -> torch.Tensor:
    """Class counts from the last layer's gradient, as B labels sorted by class. int64 [B].

    ``gradients`` are in the scale of a mean gradient over the batch (``mean_scale``); ``probe_inputs``
    [N, ...] are inputs the attacker holds (its auxiliary images), on which the batch's mean softmax
    (and mean feature sum) are estimated.
    """
    layer = last_layer(update)
    batch = update.batch_size
    probs, features = _probe(update.model, layer.module, probe_inputs)
    if layer.bias_index is not None:
        counts = batch * (probs.mean(0) - gradients[layer.bias_index].double())
    else:
        sums = features.sum(1, keepdim=True)  # S_i [N, 1]
        row_sums = gradients[layer.weight_index].double().sum(1)
        counts = batch * ((probs * sums).mean(0) - row_sums) / sums.mean().clamp_min(1e-12)
    return _round_counts(counts, batch)


def _probe(model: nn.Module, layer: nn.Linear, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax outputs [N, K] and the final layer's input features [N, D] of ``inputs``, float64."""
    import copy

    work = copy.deepcopy(model)  # a train-mode forward must not move the attacker's own running statistics
    target = dict(work.named_modules())[next(n for n, m in model.named_modules() if m is layer)]
    captured: list[torch.Tensor] = []
    handle = target.register_forward_hook(lambda _m, args, _out: captured.append(args[0].detach()))
    try:
        with torch.no_grad():
            logits = work(inputs)
    finally:
        handle.remove()
    return torch.softmax(logits.double(), -1), captured[-1].double().flatten(1)


def _round_counts(counts: torch.Tensor, total: int) -> torch.Tensor:
    """Non-negative integer counts summing to ``total`` nearest ``counts`` [K] (largest remainder), as labels."""
    counts = counts.clamp_min(0)
    if float(counts.sum()) <= 0:
        counts = torch.ones_like(counts)
    counts = counts * (total / counts.sum())
    whole = counts.floor().long()
    remainder = counts - whole
    for k in remainder.argsort(descending=True)[: total - int(whole.sum())]:
        whole[k] += 1
    return torch.repeat_interleave(torch.arange(len(whole)), whole)
