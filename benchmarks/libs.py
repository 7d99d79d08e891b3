"""The same three architectures built in exactflow, zuko, nflows and normflows.

Every library gets one :class:`Model` adapter with ``log_prob(x)`` (data -> latent, the
training direction) and ``sample(n)`` (latent -> data), so the harness times the same calls
everywhere. The architectures, as far as each library allows:

* **MAF**: 5 masked affine autoregressive layers, MADE with 2 hidden layers of width ``h``
  and ReLU, feature order reversed between layers, standard normal base.
* **IAF**: the same layers with the directions swapped: sampling is one MADE pass per
  layer, the density of given points is the sequential (``d``-step) direction.
* **RealNVP**: 8 affine coupling layers, alternating masks, MLP conditioner ``2 x h`` with
  ReLU, **no batch norm** in any library.
* **NSF**: 5 rational-quadratic spline coupling layers, 8 bins, bound 5, the identity
  outside ``[-5, 5]`` with unit slope at the boundary in all four (nflows/normflows call
  it "linear" tails), alternating masks, MLP ``2 x h``.

Per-library notes (what each one's own API gives; kept as close as it allows):

* zuko: ``zuko.flows.MAF`` (alternating orders instead of permutation layers),
  ``zuko.flows.RealNVP``, and NSF as ``GeneralCouplingTransform`` with zuko's
  ``MonotonicRQSTransform`` (zuko's own ``NSF`` preset is a masked autoregressive network,
  not a coupling MLP).
* nflows: ``MaskedAffineAutoregressiveTransform(num_blocks=1, use_residual_blocks=False)``
  is exactly MADE ``2 x h``; coupling layers get ``nflows.nn.nets.MLP`` (wrapped to accept
  the ``context`` argument nflows passes).
* normflows: its ``MaskedAffineAutoregressive`` computes the *density* with the sequential
  pass (normflows' ``forward`` is latent -> data), which would make its training ``D``
  times slower; we wrap it in ``normflows.flows.Reverse`` so that it has MAF costs (fast
  density, sequential sampling), its best case. Unwrapped, it is the IAF.
* IAF: exactflow's ``models.iaf``; zuko's MAF layers each replaced by its lazy inverse
  (``t.inv``); nflows' ``MaskedAffineAutoregressiveTransform`` inside ``InverseTransform``.

Parameter counts: ``Model.parameters`` counts every stored trainable number, as each
library reports it; ``Model.effective_parameters`` counts the weights a mask multiplies by
zero as absent (exactflow's MADE does not store them; the peers store dense masked
matrices). Compare models by the effective count: equal architectures have equal effective
counts whatever the storage. Its RealNVP uses ``AffineCouplingBlock``
  with ``split_mode`` alternating ``channel``/``channel_inv`` (halves rather than parity;
  same cost and size), NSF uses its ``PiecewiseRationalQuadraticCoupling`` with
  ``normflows.nets.MLP`` (no unconditional spline on the identity half).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

__all__ = [
    "LIBRARIES", "MODELS", "Model", "build", "available", "version", "effective_parameters"
]

LIBRARIES = ("exactflow", "zuko", "nflows", "normflows")
MODELS = ("maf", "iaf", "realnvp", "nsf")
LAYERS = {"maf": 5, "iaf": 5, "realnvp": 8, "nsf": 5}
BINS = 8
BOUND = 5.0


@dataclass
class Model:
    """One library's flow behind a uniform interface."""

    library: str
    name: str
    module: nn.Module
    log_prob: Callable[[Tensor], Tensor]
    sample: Callable[[int], Tensor]
    note: str = ""

    @property
    def parameters(self) -> int:
        """Every stored trainable number, as the library counts it."""
        return sum(p.numel() for p in self.module.parameters() if p.requires_grad)

    @property
    def effective_parameters(self) -> int:
        """:attr:`parameters` less the weights a fixed mask multiplies by zero."""
        return effective_parameters(self.module)


def effective_parameters(module: nn.Module) -> int:
    """Trainable numbers that can change the output: a masked layer's weight counts only
    where its ``mask`` buffer (same shape, as in zuko's, nflows' and normflows' masked
    linear layers) is nonzero."""
    total = 0
    for sub in module.modules():
        weight = sub._parameters.get("weight")
        mask = sub._buffers.get("mask")
        for p in sub._parameters.values():
            if p is None or not p.requires_grad:
                continue
            if p is weight and mask is not None and mask.shape == p.shape:
                total += int((mask != 0).sum())
            else:
                total += p.numel()
    return total


def available(library: str) -> bool:
    """Whether ``library`` imports here."""
    try:
        __import__(library)
    except ImportError:
        return False
    return True


def version(library: str) -> str:
    from importlib.metadata import PackageNotFoundError  # noqa: PLC0415
    from importlib.metadata import version as _version  # noqa: PLC0415

    try:
        return _version(library)
    except PackageNotFoundError:
        return "not installed"


def build(library: str, model: str, features: int, hidden: int) -> Model:
    """Build ``model`` (``maf``, ``realnvp`` or ``nsf``) in ``library`` for ``features``."""
    if library not in LIBRARIES:
        raise ValueError(f"unknown library {library!r}; choose from {', '.join(LIBRARIES)}")
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose from {', '.join(MODELS)}")
    if features < 2 or features % 2:
        raise ValueError(f"the benchmark architectures need an even features >= 2, got {features}")
    maker = {
        "exactflow": _exactflow,
        "zuko": _zuko,
        "nflows": _nflows,
        "normflows": _normflows,
    }[library]
    return maker(model, features, hidden)


# -- exactflow ---------------------------------------------------------------------------
def _exactflow(model: str, d: int, h: int) -> Model:
    import exactflow as ef  # noqa: PLC0415

    builder = getattr(ef.models, model)
    kwargs: dict = {"layers": LAYERS[model], "hidden": (h, h)}  # maf, iaf: reversed orders
    if model == "realnvp":
        kwargs["batch_norm"] = False
    if model == "nsf":
        kwargs.update(bins=BINS, bound=BOUND, kind="coupling")
    params = inspect.signature(builder).parameters
    kwargs = {k: v for k, v in kwargs.items() if k in params}
    flow = builder(d, **kwargs)
    return Model("exactflow", model, flow, flow.log_prob, flow.sample)


# -- zuko --------------------------------------------------------------------------------
def _zuko(model: str, d: int, h: int) -> Model:
    import zuko  # noqa: PLC0415
    from zuko.distributions import DiagNormal  # noqa: PLC0415
    from zuko.flows import Flow, GeneralCouplingTransform, UnconditionalDistribution  # noqa: PLC0415
    from zuko.transforms import MonotonicRQSTransform  # noqa: PLC0415

    note = ""
    if model == "maf":
        flow = zuko.flows.MAF(d, transforms=LAYERS[model], hidden_features=(h, h))
    elif model == "iaf":
        maf = zuko.flows.MAF(d, transforms=LAYERS[model], hidden_features=(h, h))
        flow = Flow([t.inv for t in maf.transform.transforms], maf.base)
        note = "MAF layers inverted (LazyInverse)"
    elif model == "realnvp":
        flow = zuko.flows.RealNVP(d, transforms=LAYERS[model], hidden_features=(h, h))
    else:
        layers = [
            GeneralCouplingTransform(
                d,
                mask=torch.arange(d) % 2 == i % 2,
                univariate=partial(MonotonicRQSTransform, bound=BOUND),
                shapes=[(BINS,), (BINS,), (BINS - 1,)],
                hidden_features=(h, h),
            )
            for i in range(LAYERS[model])
        ]
        base = UnconditionalDistribution(
            DiagNormal, torch.zeros(d), torch.ones(d), buffer=True
        )
        flow = Flow(layers, base)
        note = "GeneralCouplingTransform + MonotonicRQSTransform"
    return Model(
        "zuko", model, flow,
        lambda x: flow().log_prob(x),
        lambda n: flow().sample((n,)),
        note,
    )


# -- nflows ------------------------------------------------------------------------------
class _ContextFree(nn.Module):
    """Lets a plain network take the ``(inputs, context)`` call that coupling layers make."""

    def __init__(self, net: nn.Module, hidden: int):
        super().__init__()
        self.net = net
        # nflows/normflows scale the spline logits by 1/sqrt(hidden_features) when the
        # conditioner exposes it, as their own ResidualNet does: keep their default init.
        self.hidden_features = hidden

    def forward(self, inputs: Tensor, context: Tensor | None = None) -> Tensor:
        return self.net(inputs)


def _nflows(model: str, d: int, h: int) -> Model:
    from nflows import distributions, flows, transforms  # noqa: PLC0415
    from nflows.nn.nets import MLP  # noqa: PLC0415

    def net(n_in: int, n_out: int) -> nn.Module:
        return _ContextFree(MLP((n_in,), (n_out,), hidden_sizes=[h, h]), h)

    layers: list[nn.Module] = []
    for i in range(LAYERS[model]):
        mask = (torch.arange(d) % 2 == i % 2).to(torch.int64)  # 1 = transformed
        if model in ("maf", "iaf"):
            made = transforms.MaskedAffineAutoregressiveTransform(
                d, h, num_blocks=1, use_residual_blocks=False
            )
            layers.append(made if model == "maf" else transforms.InverseTransform(made))
            if i < LAYERS[model] - 1:
                layers.append(transforms.ReversePermutation(d))
        elif model == "realnvp":
            layers.append(transforms.AffineCouplingTransform(mask, net))
        else:
            layers.append(
                transforms.PiecewiseRationalQuadraticCouplingTransform(
                    mask, net, num_bins=BINS, tails="linear", tail_bound=BOUND
                )
            )
    flow = flows.Flow(transforms.CompositeTransform(layers), distributions.StandardNormal([d]))
    return Model("nflows", model, flow, flow.log_prob, flow.sample)


# -- normflows ---------------------------------------------------------------------------
def _normflows(model: str, d: int, h: int) -> Model:
    import normflows as nf  # noqa: PLC0415
    from normflows.flows.neural_spline.coupling import (  # noqa: PLC0415
        PiecewiseRationalQuadraticCoupling,
    )

    class _SplineCoupling(nf.flows.Flow):
        # normflows' own CoupledRationalQuadraticSpline wrapper, with an MLP conditioner
        # and no unconditional spline: forward = latent -> data, inverse = data -> latent.
        def __init__(self, mask: Tensor):
            super().__init__()
            self.prqct = PiecewiseRationalQuadraticCoupling(
                mask=mask,
                transform_net_create_fn=lambda n_in, n_out: _ContextFree(
                    nf.nets.MLP([n_in, h, h, n_out]), h
                ),
                num_bins=BINS, tails="linear", tail_bound=BOUND,
            )

        def forward(self, z: Tensor, context: Tensor | None = None):
            z, log_det = self.prqct.inverse(z, context)
            return z, log_det.view(-1)

        def inverse(self, z: Tensor, context: Tensor | None = None):
            z, log_det = self.prqct(z, context)
            return z, log_det.view(-1)

    note = ""
    layers: list[nn.Module] = []
    for i in range(LAYERS[model]):
        if model in ("maf", "iaf"):
            made = nf.flows.MaskedAffineAutoregressive(
                d, h, num_blocks=1, use_residual_blocks=False
            )
            layers.append(nf.flows.Reverse(made) if model == "maf" else made)
            if i < LAYERS[model] - 1:
                perm = nf.flows.Permute(d, mode="shuffle")
                perm.perm.copy_(torch.arange(d - 1, -1, -1))
                perm.inv_perm.copy_(torch.arange(d - 1, -1, -1))
                layers.append(perm)
            note = (
                "MaskedAffineAutoregressive wrapped in flows.Reverse (MAF costs)"
                if model == "maf" else "MaskedAffineAutoregressive (IAF costs)"
            )
        elif model == "realnvp":
            mlp = nf.nets.MLP([d // 2, h, h, d])
            split = "channel" if i % 2 == 0 else "channel_inv"
            layers.append(nf.flows.AffineCouplingBlock(mlp, scale=True, split_mode=split))
            note = "AffineCouplingBlock, halves split alternating"
        else:
            layers.append(_SplineCoupling((torch.arange(d) % 2 == i % 2).to(torch.int64)))
    # normflows applies flows[0] first when sampling: list the layers latent -> data.
    layers.reverse()
    base = nf.distributions.DiagGaussian(d, trainable=False)
    flow = nf.NormalizingFlow(base, layers)
    return Model(
        "normflows", model, flow, flow.log_prob, lambda n: flow.sample(n)[0], note
    )
