"""``Flow``, a base density (:mod:`exactflow.bases`) pushed through a transform.

A :class:`Flow` scores data exactly by the change of variables::

    log p(x | c) = log p_base(f(x; c)) + log|det df/dx (x; c)|

where ``f`` is its transform's ``forward`` (data -> latent), and samples in one pass
through ``inverse`` (latent -> data).

Shapes follow ``torch.distributions``: ``sample(n)`` gives ``(n, features)``; with a batch
of contexts ``(b, c)`` it gives ``(n, b, features)``, and with one context vector ``(c,)``
it gives ``(n, features)``. Rows and contexts pair by broadcasting their leading shapes
(:mod:`exactflow.shapes`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .bases import DiagonalNormal, Distribution, StandardNormal, Uniform, seeded_from, tensor_of
from .core import Compose, Transform, library_layers_only, per_row
from .nn.passes import is_plain
from .shapes import paired, sample_shape
from .transforms.standardize import Standardize
from .transforms.support import Support
from .validation import non_negative_int, not_a_pair, warn_user

__all__ = ["Distribution", "StandardNormal", "DiagonalNormal", "Uniform", "Flow"]


def _overflow_to_neg_inf(log_pz: Tensor, ladj: Tensor, x: Tensor,
                         context: Tensor | None = None) -> Tensor:
    """``log_pz + ladj`` with NaN replaced by ``-inf`` in the rows of ``x`` that hold no NaN and
    overflowed, and NaN where the context is not finite (no conditional density is defined
    there).

    Such a NaN comes from ``inf - inf`` or ``0 * inf`` in a layer: the row overflowed the
    dtype on its way to the latent space, so it lies so far out that its density is below
    the smallest positive float. A NaN log-determinant beside a finite latent is not an
    overflow but a layer's mistake (``torch.logdet`` of a matrix with a negative
    determinant, say): it stays NaN, for the checks downstream to name.
    """
    # A row's sum of absolute values is NaN exactly when the row holds NaN (never inf -
    # inf), and sums 5x faster than isnan(x).any(-1) reduces (10,000 rows of 64).
    # (A finite base density: a finite latent, with the bases of exactflow and torch.)
    log_p = log_pz + ladj
    broken = torch.isnan(ladj) & torch.isfinite(log_pz)
    overflowed = torch.isnan(log_p) & ~torch.isnan(x.abs().sum(-1)) & ~broken
    log_p = log_p.masked_fill(overflowed, -math.inf)
    if context is None:
        return log_p
    return log_p.masked_fill(~torch.isfinite(context.abs().sum(-1)), math.nan)


class Flow(Distribution):
    """A normalizing flow: a base density pushed through an invertible transform.

    ``log_prob`` runs the transform's ``forward`` (data -> latent) and adds the base
    log-density and the log-determinant; ``sample`` draws from the base and runs
    ``inverse`` (latent -> data) in one pass. ``log_prob`` is differentiable, so a flow
    trains by maximum likelihood (``-log_prob(x).mean()``); as in ``torch.distributions``,
    ``sample`` and ``sample_and_log_prob`` run without autograd, and :meth:`rsample` and
    :meth:`rsample_and_log_prob` are the differentiable draws that reverse-KL fitting
    back-propagates through.

    Args:
        transform: the data -> latent map (an :class:`exactflow.Transform`).
        base: the latent density, e.g. :class:`StandardNormal`.
        context: the size of the conditioning vector, 0 for an unconditional flow.
        embedding: an optional network that encodes the context before the transform sees
            it, ``(batch, context) -> (batch, k)``, trained jointly with the flow and saved
            with it (as nflows' ``embedding_net``); the transform's layers then take ``k``
            context features. Use it for high-dimensional or structured contexts.
        context_scaler: an optional fixed map applied to the context first (builders put a
            :class:`~exactflow.transforms.Standardize` there with ``standardize=True``, and
            :func:`exactflow.fit` fills it from the training context).

    Example:
        >>> import torch, exactflow as ef
        >>> flow = ef.Flow(ef.transforms.LULinear(2), ef.StandardNormal(2))
        >>> flow.log_prob(torch.randn(10, 2)).shape
        torch.Size([10])
        >>> flow.sample(4).shape
        torch.Size([4, 2])
    """

    def __init__(
        self,
        transform: Transform,
        base: Distribution,
        context: int | None = 0,
        embedding: nn.Module | None = None,
        context_scaler: Transform | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(transform, Transform):
            raise TypeError(
                f"transform must be an exactflow Transform, got {type(transform).__name__}"
            )
        if not isinstance(base, Distribution):
            hint = (": wrap it in a subclass of exactflow.Distribution (features, log_prob "
                    "and rsample: see ef.bases)" if isinstance(base, torch.distributions
                                                              .Distribution) else "")
            raise TypeError(
                f"base must be an exactflow Distribution, got {type(base).__name__}{hint}")
        # (None is zuko's and nflows' way to say "no context")
        context = 0 if context is None else non_negative_int(context, "context")
        if embedding is not None and not isinstance(embedding, nn.Module):
            raise TypeError(f"embedding must be a torch.nn.Module, got {type(embedding).__name__}")
        if embedding is not None and not context:
            raise ValueError("an embedding network encodes the context: give context > 0")
        if transform.features is not None and transform.features != base.features:
            raise ValueError(
                f"the transform maps {transform.features} features but the base has "
                f"{base.features}"
            )
        needs = transform.context_features
        # (exactflow's own layers declare their context; a user's may read it undeclared)
        if context and not needs and library_layers_only(transform):
            raise ValueError(
                f"the flow has context={context} but none of its layers takes a context, so "
                "the context would be ignored: build conditional layers (context=... as a "
                "keyword, e.g. MaskedAffineAutoregressive(2, context=1); the second "
                "positional argument of most layers is hidden) or give context=0")
        if embedding is None and needs and needs != context:
            embed = f" (or an embedding from {context} features to {needs})" if context else ""
            raise ValueError(f"the transform's layers take a context of {needs} features but "
                             f"the flow has context={context}: give context={needs}{embed}")
        if getattr(base, "context_features", 0):
            raise ValueError(
                f"the base is conditional (context={base.context_features}), and a flow "
                "passes no context to its base: put the inner flow's layers in the transform "
                "(ef.Compose(outer, inner.transform)) with the inner base as the base")
        if context_scaler is not None and context_scaler.features != context:
            raise ValueError(f"the context scaler takes {context_scaler.features} features, "
                             f"the context has {context}")
        self.transform = transform
        self.base = base
        self.context_scaler = context_scaler
        self.embedding = embedding
        self.features = base.features
        self.context_features = int(context)
        #: The builder name and arguments that made this flow (set by exactflow.models;
        #: exactflow.save stores it so exactflow.load can rebuild the model).
        self.config: dict[str, Any] | None = None

    # -- input handling ---------------------------------------------------------------
    def _param_like(self) -> Tensor | None:
        for p in self.parameters():
            return p
        for b in self.buffers():
            if b.is_floating_point():
                return b
        return None

    def _as_tensor(self, x: Any, name: str, exact: bool = False) -> Tensor:
        """``x`` as a tensor in the flow's dtype and on its device.

        A real tensor or array is cast to the dtype of the flow's parameters (a float64
        tensor into a float32 flow computes in float32, as the weights do): values beyond
        that dtype's range become ``inf``, and :meth:`log_prob` scores such rows ``-inf``.
        With ``exact`` (the first layer is a :class:`~exactflow.transforms.Standardize`,
        which standardizes in float64 and then casts to the model's dtype), float64 input
        is passed as it is.
        """
        ref = self._param_like()
        target = ref.dtype if ref is not None else torch.get_default_dtype()
        if isinstance(x, Tensor):
            if x.is_complex():
                raise TypeError(f"{name} must be numeric and real, got a tensor of dtype {x.dtype}")
            keep = x.is_floating_point() and (
                ref is None or x.dtype == target or (exact and x.dtype == torch.float64))
            t = x if keep else x.to(target)
        else:
            arr = np.asarray(x)
            if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
                raise TypeError(
                    f"{name} must be numeric and real, got an array of dtype {arr.dtype}"
                )
            keep64 = exact and arr.dtype == np.float64
            t = tensor_of(arr, None if keep64 or ref is None else target)
        if ref is not None and t.device != ref.device:
            t = t.to(ref.device)
        return t

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype data should reach the flow in: float64 when its first layer is a
        :class:`~exactflow.transforms.Standardize` (which standardizes in float64 before
        casting), else the dtype of its parameters."""
        if self._standardizes_first(self.transform):
            return torch.float64
        ref = self._param_like()
        return ref.dtype if ref is not None else torch.get_default_dtype()

    @property
    def context_dtype(self) -> torch.dtype:
        """The dtype the context should reach the flow in (float64 for a context scaler)."""
        if isinstance(self.context_scaler, Standardize):
            return torch.float64
        ref = self._param_like()
        return ref.dtype if ref is not None else torch.get_default_dtype()

    @staticmethod
    def _first_layer(module: nn.Module | None) -> nn.Module | None:
        """The first layer of ``module`` (itself unless a ``Compose``)."""
        while isinstance(module, Compose) and len(module.transforms):
            module = module.transforms[0]
        return module

    @classmethod
    def _standardizes_first(cls, module: nn.Module | None) -> bool:
        """Whether ``module`` starts with a :class:`~exactflow.transforms.Standardize` (or a
        :class:`~exactflow.transforms.Support`), which takes float64 input as it is."""
        return isinstance(cls._first_layer(module), (Standardize, Support))

    def _rows(self, x: Any, context: Any, name: str = "x"
              ) -> tuple[Tensor, Tensor | None, tuple[int, ...] | None]:
        """Rows ``x (..., features)`` and their context ``(..., c)``, paired by broadcasting
        (:func:`~exactflow.shapes.paired`): the rows flattened, one context row each, and
        the leading shape to give results back in (``None``: one per row, as given)."""
        given = self._check_context(context)  # (first: a missing context is what lacks)
        x = self._as_tensor(x, name, exact=name == "x" and self._standardizes_first(
            self.transform))  # (latents z reach the base side: the weights' dtype)
        if torch.jit.is_tracing():  # (a trace records rows (batch, d) as given: no shape
            return x, given, None  # is compared, so no batch size is baked in)
        return paired(x, given, self.features, name)

    def _check_context(self, context: Any) -> Tensor | None:
        """The context as a tensor of shape ``(..., context_features)``, checked."""
        c = self.context_features
        if c == 0:
            if context is not None:
                raise ValueError(
                    "this flow is unconditional (context=0) but a context was given"
                )
            return None
        if context is None:
            raise ValueError(f"this flow is conditional: pass a context of shape (batch, {c}) "
                             "(flow(x, context) is flow.log_prob(x, context); zuko's "
                             "flow(c).log_prob(x) is flow.log_prob(x, c) here)")
        context = self._as_tensor(context, "context",
                                  exact=self._standardizes_first(self.context_scaler))
        if context.dim() == 0 or context.shape[-1] != c:
            hint = ("; for one context feature use context.reshape(-1, 1)" if c == 1 and
                    context.dim() == 1 else "")
            raise ValueError(f"context must have shape (..., {c}), got "
                             f"{tuple(context.shape)}{hint}")
        return context

    # -- density --------------------------------------------------------------------
    def log_prob(self, x: Any, context: Any = None) -> Tensor:
        """Exact log-density of each row of ``x`` (shape ``(batch,)``), in the units of ``x``.

        ``x`` may be a tensor of any real dtype, an array or nested lists: it is cast to the
        flow's dtype and moved to its device (so a float64 tensor into a float32 flow
        works, and computes in float32).

        ``x (..., features)`` scores as ``(...)`` (one row ``(features,)`` as ``()``). A
        conditional flow pairs ``x`` with a context ``(..., c)`` by broadcasting their
        leading shapes (:mod:`exactflow.shapes`): one context row per row of ``x``, one
        context for all rows (``(c,)`` or ``(1, c)``), a batch ``(b, c)`` with samples ``x``
        of shape ``(n, b, features)`` (what ``sample(n, context)`` returns) scored as
        ``(n, b)``, one row ``(features,)`` under each of ``b`` contexts ``(b, c)`` as
        ``(b,)`` (a likelihood across parameters).

        Never NaN for a row without NaN (from exactflow's layers: a layer of your own whose
        log-determinant is NaN at a finite latent gives NaN, which
        :func:`exactflow.check_transform` traces to it): every such row gets a log-density
        that is finite or ``-inf``. A row far enough out that the computation overflows the
        flow's dtype (``1e39`` in float32, or ``inf``) has a density below the smallest
        positive float, and its ``-inf`` says so instead of the ``inf - inf = NaN`` the
        layers would give.
        A row on or outside the limits of a flow built with ``bounds=`` gets ``-inf`` (the
        density there is 0; :meth:`to_latent` refuses it: it has no latent).
        A row holding NaN, or whose context holds NaN or inf, gives NaN (it has no density;
        check data upstream, as
        :func:`exactflow.scoring.log_prob` does). The replacement is a ``masked_fill`` (no
        host sync, compilable). Train only on finite data: an overflowing row in a batch
        still makes the weights' gradient NaN (``0 * inf`` in the layers' products).
        """
        x, given, lead = self._rows(x, context)
        if not self._checked_prepared and self.training and torch.is_grad_enabled() and (
                is_plain(x)):  # (no values to look at under torch.func, compile or a trace)
            self._warn_if_unprepared()
        first, outside = self._first_layer(self.transform), None
        if isinstance(first, Support):  # (beyond the limits the density is 0)
            x, outside = first.held_inside(x)
        z, ladj = self._map(x, given)
        log_p = _overflow_to_neg_inf(self._base_log_prob(z), ladj, x, given)
        log_p = log_p if outside is None else log_p.masked_fill(outside, -math.inf)
        return log_p if lead is None else log_p.reshape(lead)

    def _base_log_prob(self, z: Tensor) -> Tensor:
        """The base's log-density of latents ``z``, checked to hold one value per row (a
        base of the user's that keeps the feature axis would broadcast against the
        log-determinants into a ``(batch, batch)`` density)."""
        log_pz = self.base.log_prob(z)
        if not torch.jit.is_tracing() and z.dim() == 2 and log_pz.shape != z.shape[:1]:
            raise ValueError(
                f"the base distribution {type(self.base).__name__} returned a log-density of "
                f"shape {tuple(log_pz.shape)} for {z.shape[0]} rows; a base must return one "
                "value per row, shape (batch,) (sum over the features: .sum(-1))")
        return log_pz

    def _map(self, x: Tensor, context: Tensor | None, inverse: bool = False
             ) -> tuple[Tensor, Tensor]:
        """The transform (or its inverse) of checked rows ``x`` under a checked, not yet
        embedded ``context``: the output and one log-det per row."""
        return self._pair(self.transform.inverse if inverse else self.transform, x,
                          self._embed(context), "inverse" if inverse else "forward")

    def _pair(self, run: Callable[..., Any], x: Tensor, context: Tensor | None,
              direction: str) -> tuple[Tensor, Tensor]:
        """``run(x, context)`` (the transform or its inverse), checked to return an output
        and one log-det per row."""
        out, name = run(x, context), type(self.transform).__name__
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise not_a_pair(out, name, direction)
        return out[0], per_row(out[1], x, out[0], name)

    #: Whether :meth:`_warn_if_unprepared` has looked at this flow (once, at its first
    #: training-mode call with autograd), or :func:`exactflow.prepare` has prepared it.
    _checked_prepared = False

    def _warn_if_unprepared(self) -> None:
        """Warn when a flow trains with its data-dependent parts still at their initial
        state (what :func:`exactflow.prepare` sets, and :func:`exactflow.fit` calls): a
        training loop of the user's own left ``standardize=True`` as the identity and a
        Gaussian base as N(0, I), without a word (NLL 11,416 against 8.49 on 100 + 20 x
        moons)."""
        self._checked_prepared = True
        unset = []
        for name, layer in (("standardization layer", self._first_layer(self.transform)),
                            ("context standardization", self.context_scaler)):
            if isinstance(layer, Standardize) and layer.is_identity():
                unset.append(f"its {name} is the identity")
        fitted = getattr(self.base, "fitted", None)
        if isinstance(fitted, Tensor) and not bool(fitted):
            unset.append(f"its {type(self.base).__name__} base is not fitted yet")
        if unset:
            warn_user(f"this flow is in training mode (autograd on) while "
                      f"{' and '.join(unset)}: call ef.prepare(flow, x) (with context=... "
                      "for a conditional flow) before a training loop of your own, as ef.fit "
                      "does")

    def _embed(self, context: Tensor | None) -> Tensor | None:
        """The context as the transform sees it: standardized, then embedded."""
        if context is None:
            return None
        if self.context_scaler is not None:
            context = self.context_scaler(context)[0]
        if self.embedding is not None:
            context = self.embedding(context)
        return context

    def encode_context(self, context: Any) -> Tensor:
        """The context as the flow's transform sees it: checked, standardized by the flow's
        context scaler and encoded by its embedding network (each where it has one).
        ``check_transform(flow.transform, x, flow.encode_context(context))`` proves a
        conditional flow's own map; with the raw context it checks another one.

        Example:
            >>> import torch, exactflow as ef
            >>> flow = ef.models.maf(2, context=3, embedding={"features": 4}).double()
            >>> flow.encode_context(torch.zeros(5, 3, dtype=torch.float64)).shape
            torch.Size([5, 4])
        """
        if self.context_features == 0:
            raise ValueError("this flow is unconditional: it has no context to encode")
        given = self._check_context(context)
        assert given is not None
        encoded = self._embed(given.reshape(-1, self.context_features))
        assert encoded is not None
        return encoded.reshape(*given.shape[:-1], -1)

    def to_latent(self, x: Any, context: Any = None) -> tuple[Tensor, Tensor]:
        """``(z, log|det dz/dx|)``: the latent that :meth:`log_prob` scores, with its input
        handling (dtype, device, its shapes and contexts, samples ``(n, b, features)``
        under ``(b, c)`` too, the context scaler and embedding): ``z`` has the shape of
        ``x``, the log-det its leading shape. ``flow.transform(x, context)`` skips the last
        two: on a flow with ``standardize=True`` or an ``embedding`` it is not the map."""
        return self._through(x, context, "x")

    def from_latent(self, z: Any, context: Any = None) -> tuple[Tensor, Tensor]:
        """``(x, log|det dx/dz|)`` for latents ``z``: the inverse of :meth:`to_latent`
        (what :meth:`sample` runs on the base's draws), with the same shapes and context
        handling."""
        return self._through(z, context, "z")

    def _through(self, x: Any, context: Any, name: str) -> tuple[Tensor, Tensor]:
        rows, given, lead = self._rows(x, context, name)
        y, ladj = self._map(rows, given, inverse=name == "z")
        return (y, ladj) if lead is None else (y.reshape(*lead, -1), ladj.reshape(lead))

    def forward(self, x: Any, context: Any = None) -> Tensor:  # nn.Module call == log_prob
        return self.log_prob(x, context)

    # -- sampling -------------------------------------------------------------------
    def _expand_context(self, n: Any, context: Any) -> tuple[Tensor | None, tuple[int, ...]]:
        """The embedded context, one row per draw (sample-major), and the draw's leading
        shape: ``n`` (an int or a shape) followed by the context's leading shape."""
        shape, given = sample_shape(n), self._check_context(context)
        if given is None:
            return None, shape
        if not (torch.compiler.is_compiling() or bool(torch.isfinite(given).all())):
            raise ValueError(f"context of shape {tuple(given.shape)} holds NaN or inf: no "
                             "conditional density to sample is defined there")
        embedded = self._embed(given.reshape(-1, self.context_features))
        assert embedded is not None
        draws, width = math.prod(shape), embedded.shape[-1]
        rows = embedded.unsqueeze(0).expand(draws, -1, -1).reshape(-1, width)
        return rows, (*shape, *given.shape[:-1])

    def rsample(self, n: int | tuple[int, ...], context: Any = None, *,
                generator: torch.Generator | None = None) -> Tensor:
        """``n`` samples, differentiable with respect to the flow's parameters."""
        return self.rsample_and_log_prob(n, context, generator=generator)[0]

    def sample(self, n: int | tuple[int, ...], context: Any = None, *,
               generator: torch.Generator | None = None) -> Tensor:
        """Draw samples in one pass through ``inverse`` (latent -> data), without autograd.

        Returns ``(n, features)``; with a context batch ``(b, c)``, ``(n, b, features)``
        (a context of any leading shape ``L``: ``(n, *L, features)``). ``n`` may be a shape,
        as ``torch.distributions`` takes ``sample_shape``: ``(2, 3)`` gives ``(2, 3, ...)``.
        Use :meth:`rsample` for samples to back-propagate through. A flow whose first layer
        is a :class:`~exactflow.transforms.Standardize` (``standardize=True``) returns
        float64 samples whatever its own dtype, so that data far from zero keep their
        spread (``1e8 + N(0, 1)`` has none in float32): ``.float()`` them for a float32
        model.

        ``generator`` (a ``torch.Generator``, as ``torch.randn`` takes one) sets the draw:
        the same generator state gives the same samples, and torch's global random state
        is left as it was (the generator advances by one number). Without it the draw
        uses torch's global random state.
        """
        with torch.no_grad():
            return self.rsample_and_log_prob(n, context, generator=generator)[0]

    def sample_and_log_prob(self, n: int | tuple[int, ...], context: Any = None, *,
                            generator: torch.Generator | None = None
                            ) -> tuple[Tensor, Tensor]:
        """Samples and their exact log-density from one pass, without autograd
        (``generator`` as in :meth:`sample`)."""
        with torch.no_grad():
            return self.rsample_and_log_prob(n, context, generator=generator)

    def rsample_and_log_prob(self, n: int | tuple[int, ...], context: Any = None, *,
                             generator: torch.Generator | None = None
                             ) -> tuple[Tensor, Tensor]:
        """Differentiable samples and their exact log-density, from one pass (no extra
        forward): the draw that reverse-KL fitting back-propagates through (``generator``
        as in :meth:`sample`)."""
        if generator is not None:  # (a seed drawn from it: the user's bases take none)
            with seeded_from(generator, self._param_like()):
                return self.rsample_and_log_prob(n, context)
        ctx, shape = self._expand_context(n, context)
        z = self.base.rsample(math.prod(shape))
        log_pz = self._base_log_prob(z)
        x, ladj_inv = self._pair(self.transform.inverse, z, ctx, "inverse")
        log_px = log_pz - ladj_inv
        return x.reshape(*shape, self.features), log_px.reshape(shape)

    def extra_repr(self) -> str:
        return f"features={self.features}, context={self.context_features}"
