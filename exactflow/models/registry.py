"""The registry of model builders: every flow it builds records a config that saves and loads.

A user's own builder joins the built-in ones (:mod:`exactflow.models.flows`) with
:func:`register`; :func:`build` rebuilds any registered model from its JSON config, which is
how :func:`exactflow.load` reads a model file without running code from it.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from ..bases import Distribution, StudentT
from ..core import Compose
from ..distributions import Flow, StandardNormal
from ..gaussians import Gaussian, GaussianMixture
from ..nn import MLP
from ..transforms.standardize import Standardize, scale_of
from ..transforms.support import Support, bounds_spec
from ..validation import choice, hidden_sizes, positive_int

__all__ = ["register", "build", "available", "standardize_layer", "support_layer",
           "with_bounds"]

Builder = TypeVar("Builder", bound=Callable[..., Flow])

_BUILDERS: dict[str, Callable[..., Flow]] = {}
# Arguments every registered builder takes through the registry, whatever its own signature.
_COMMON = ("standardize", "embedding", "base", "bounds")


def register(
    fn: Builder | str | None = None, *, name: str | None = None, replace: bool = False
) -> Any:
    """Register a model builder, so the flows it makes save and load.

    A builder is a function ``(features, *, ...) -> Flow`` whose keyword arguments are
    JSON values (numbers, strings, lists, dicts). Registered, it records its name and
    arguments in ``flow.config`` (which :func:`exactflow.save` stores as JSON) and gains two
    keyword arguments shared by every builder:

    * ``standardize=True`` puts a fixed :class:`~exactflow.transforms.Standardize` layer
      first; :func:`exactflow.fit` (or :func:`exactflow.prepare`, before a loop of your
      own) fills its mean and standard deviation from the training data, so ``log_prob``
      stays in the units of the data (``standardize="pooled"``: one scale for every
      column, for columns on one common scale such as pixels);
    * ``embedding={"features": k, "hidden": [64]}`` encodes the context with an MLP trained
      jointly with the flow (the builder's layers then see ``k`` context features); the
      builder itself is called with ``context=k``;
    * ``base="gaussian"`` (full covariance) or ``base={"name": "gmm", "components": k,
      "covariance": "full" | "diag"}`` replaces the standard normal base by a Gaussian or
      Gaussian mixture that :func:`exactflow.fit` first fits to the training data (in
      closed form or by EM) and then keeps fixed (``"trainable": True`` in the dict lets
      gradients move it too): every transform starts at the identity, so at step 0 the
      flow *is* the classical model, and training with validation keeps only what
      improves on it; ``base="student"`` (or ``{"name": "student", "df": 5.0,
      "trainable": True}``) is :class:`~exactflow.StudentT`, heavy tails whose degrees of
      freedom train with the flow, for data whose far rows a normal base scores hundreds
      of nats too low;
    * ``bounds=(0, 1)`` (every column) or one ``(low, high)`` per column, ``None`` for no
      limit (``[(0, None), (-1, 1), None]``: positive, in (-1, 1), unbounded) puts a
      :class:`~exactflow.transforms.Support` layer first, before the standardization: it
      maps each bounded column onto the real line (``log(x - low)``, ``logit`` of the
      scaled value), so samples respect the limits and the density is 0 outside them.

    :func:`exactflow.load` rebuilds a flow with :func:`build`, so the process that loads a
    model must register the same builder first (as a class must be importable to unpickle
    it); loading never runs code from the file.

    Use it as a decorator, ``@ef.models.register``, ``@ef.models.register("mine")`` or
    ``@ef.models.register(name="mine")``.

    Args:
        fn: the builder.
        name: the registry name (default: the function's name).
        replace: allow replacing a builder registered under the same name.

    Returns:
        The registered builder (a wrapper of ``fn`` with ``standardize``, ``embedding`` and
        ``base``).

    Raises:
        ValueError: the name is taken (without ``replace``) or the builder takes no
            ``features`` first argument.

    Example:
        >>> import exactflow as ef
        >>> @ef.models.register(name="shifted_maf_doc", replace=True)
        ... def shifted_maf(features, *, layers=2, context=0):
        ...     return ef.models.maf(features, layers=layers, hidden=(16,), context=context)
        >>> flow = shifted_maf(3, standardize=True)
        >>> flow.config["model"], flow.config["layers"], flow.config["standardize"]
        ('shifted_maf_doc', 2, True)
    """
    if isinstance(fn, str):  # (the name given first, as register_map takes it)
        if name is not None:
            raise TypeError(f"register: the name given twice, {fn!r} and name={name!r}")
        return functools.partial(register, name=fn, replace=replace)
    if fn is None:
        return functools.partial(register, name=name, replace=replace)
    key = name or fn.__name__
    signature = inspect.signature(fn)
    params = list(signature.parameters)
    if not params or params[0] != "features":
        raise ValueError(f"a builder takes 'features' as its first argument; {key!r} does not")
    if key in _BUILDERS and not replace:
        raise ValueError(
            f"a builder named {key!r} is registered already; pass replace=True to replace it"
        )
    own = {k: signature.parameters[k] for k in _COMMON if k in signature.parameters}

    @functools.wraps(fn)
    def wrapper(
        *args: Any, standardize: bool | str = False, embedding: dict[str, Any] | None = None,
        base: str | dict[str, Any] = "normal", bounds: Any = None, **kwargs: Any,
    ) -> Flow:
        if "standardize" in own:  # the builder standardizes itself, as it understands it
            kwargs["standardize"] = standardize
            scale = "columns" if standardize else None
        else:
            scale = scale_of(standardize)
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as err:
            takes = ", ".join([*signature.parameters, *(k for k in _COMMON if k not in own)])
            raise TypeError(f"{key}(): {err}; it takes {takes}") from None
        bound.apply_defaults()
        spec = _embedding_spec(embedding, bound.arguments.get("context", 0))
        base_spec = _base_spec(base)
        call = dict(bound.arguments)
        if spec is not None:
            call["context"] = spec["features"]
        built = fn(**call)
        if not isinstance(built, Flow):
            raise TypeError(f"builder {key!r} returned {type(built).__name__}, not a Flow")
        if spec is not None and not any(p.requires_grad for p in built.parameters()):
            raise ValueError(f"the {key} model is fitted in closed form: an embedding of its "
                             "context would stay as initialized (the fit takes its first "
                             "outputs, and nothing trains it); leave embedding= out, or use a "
                             "flow (maf, nsf) with it")
        config: dict[str, Any] = {"model": key}
        for arg, value in bound.arguments.items():
            config[arg] = list(value) if isinstance(value, tuple) else value
        config["standardize"] = (bool(standardize) if "standardize" in own else
                                 "pooled" if scale == "pooled" else scale is not None)
        d = built.features
        transform = built.transform
        if scale is not None and "standardize" not in own:
            transform = Compose(Standardize.identity(d, pooled=scale == "pooled"), transform)
        limits = bounds_spec(bounds, d)
        if limits is not None:
            transform = Compose(Support(limits, d), transform)
            config["bounds"] = limits
        flow_base = built.base
        if base_spec is not None:
            if not isinstance(built.base, StandardNormal):
                raise ValueError(f"the {key!r} model has its own base density; base= does "
                                 "not apply to it")
            flow_base = _make_base(base_spec, d)
            config["base"] = base_spec
        context, net = built.context_features, built.embedding
        if spec is not None:
            context = spec["context"]
            net = MLP(spec["context"], spec["features"], hidden=spec["hidden"])
            config["embedding"] = spec
        scaler = Standardize.identity(context) if scale is not None and context else None
        flow = Flow(transform, flow_base, context=context, embedding=net, context_scaler=scaler)
        flow.config = config
        return flow

    wrapper.__signature__ = _public_signature(signature)  # type: ignore[attr-defined]
    if wrapper.__doc__ and "standardize:" not in wrapper.__doc__:
        wrapper.__doc__ = wrapper.__doc__.rstrip() + _SHARED_DOC
    _BUILDERS[key] = wrapper
    return wrapper


#: What every registered builder's docstring says of the keywords it gains.
_SHARED_DOC = """

    Every builder also takes (:func:`exactflow.models.register`):

    * ``standardize``: ``True`` or ``"columns"`` puts a fixed Standardize layer first,
      filled from the training rows by :func:`exactflow.fit` (or :func:`exactflow.prepare`);
      ``"pooled"`` one scale for every column; ``False`` (default) none.
    * ``embedding``: ``{"features": k, "hidden": [64]}``, an MLP that encodes the context,
      trained with the flow.
    * ``base`` (flows; not the gaussian and gmm models): ``"normal"`` (default),
      ``"gaussian"`` or ``{"name": "gmm", "components": k, "covariance": "full" |
      "diag"}``, fitted to the training rows first, then fixed.
    * ``bounds``: ``(low, high)`` for every column or one pair per column (``None`` for no
      limit): a :class:`~exactflow.transforms.Support` layer maps them onto the real line
      first; ``None`` (default) for none.
"""


def _public_signature(signature: inspect.Signature) -> inspect.Signature:
    """The builder's signature with ``standardize`` and ``embedding`` (keyword-only) added."""
    params = list(signature.parameters.values())
    names = {p.name for p in params}
    extra = [
        inspect.Parameter("standardize", inspect.Parameter.KEYWORD_ONLY, default=False,
                          annotation="bool | str"),
        inspect.Parameter("embedding", inspect.Parameter.KEYWORD_ONLY, default=None,
                          annotation="dict[str, Any] | None"),
        inspect.Parameter("base", inspect.Parameter.KEYWORD_ONLY, default="normal",
                          annotation="str | dict[str, Any]"),
        inspect.Parameter("bounds", inspect.Parameter.KEYWORD_ONLY, default=None,
                          annotation="Any"),
    ]
    tail = [p for p in extra if p.name not in names]
    var_kw = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    rest = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
    return signature.replace(parameters=rest + tail + var_kw)


def _base_spec(base: Any) -> dict[str, Any] | None:
    """The base density as a JSON config (``None`` for the standard normal)."""
    if base == "normal" or base is None:
        return None
    given = base
    if isinstance(base, str):
        base = {"name": base}
    if not isinstance(base, dict) or base.get("name") not in ("gaussian", "gmm", "student"):
        raise ValueError(
            "base must be 'normal', 'gaussian', 'gmm', 'student' or a dict such as "
            f"{{'name': 'gmm', 'components': 8, 'covariance': 'diag'}}, got {given!r}"
        )
    if base["name"] == "student":
        unknown = set(base) - {"name", "df", "trainable"}
        if unknown:
            raise ValueError(f"unknown keys for the student base: {sorted(unknown)}")
        df = base.get("df", 5.0)
        if isinstance(df, bool) or not isinstance(df, (int, float)) or not df > 1:
            raise ValueError(f"the student base's df must be a number above 1, got {df!r}")
        return {"name": "student", "df": float(df),
                "trainable": bool(base.get("trainable", True))}
    unknown = set(base) - {"name", "components", "covariance", "trainable"}
    if unknown or (base["name"] == "gaussian" and "components" in base):
        raise ValueError(f"unknown keys for the {base['name']} base: {sorted(unknown)}")
    spec: dict[str, Any] = {"name": base["name"],
                            "covariance": choice(base.get("covariance", "full"), "covariance",
                                                 ("full", "diag")),
                            "trainable": bool(base.get("trainable", False))}
    if base["name"] == "gmm":
        spec["components"] = positive_int(base.get("components", 4), "components")
    return spec


def _make_base(spec: dict[str, Any], features: int) -> Distribution:
    trainable = spec.get("trainable", False)
    if spec["name"] == "student":
        return StudentT(features, spec["df"], trainable=trainable)
    if spec["name"] == "gaussian":
        return Gaussian(features, spec["covariance"], trainable=trainable)
    return GaussianMixture(features, spec["components"], spec["covariance"], trainable=trainable)


def _embedding_spec(embedding: Any, context: Any) -> dict[str, Any] | None:
    if embedding is None:
        return None
    if not isinstance(embedding, dict) or "features" not in embedding:
        own = ("; for a network of your own (k outputs), build the flow for a context of k "
               "and wrap it: inner = ef.models.maf(d, context=k); ef.Flow(inner.transform, "
               "inner.base, context=c, embedding=net) (ef.save then needs a builder of "
               "your own, ef.models.register, or save its state_dict)"
               if isinstance(embedding, nn.Module) else "")
        raise ValueError(
            "embedding must be a dict such as {'features': 8, 'hidden': [64]} (an MLP the "
            f"builder makes and saves), got {embedding!r}{own}"
        )
    unknown = set(embedding) - {"features", "hidden", "context"}
    if unknown:
        raise ValueError(f"unknown embedding keys {sorted(unknown)}; use 'features', 'hidden'")
    context = positive_int(context, "context (the size of the raw context, for an embedding)")
    if embedding.get("context", context) != context:  # (a saved config repeats it)
        raise ValueError(
            f"embedding context {embedding['context']!r} differs from the builder's "
            f"context={context}: the embedding's input is the raw context; leave the key out"
        )
    return {
        "context": context,
        "features": positive_int(embedding["features"], "embedding features"),
        "hidden": list(hidden_sizes(embedding.get("hidden", [64]), "embedding hidden")),
    }


def available() -> list[str]:
    """Names of the registered builders."""
    return sorted(_BUILDERS)


def takes(name: str, argument: str) -> bool:
    """Whether the registered builder ``name`` takes ``argument`` (``"hidden"``...)."""
    return argument in inspect.signature(_BUILDERS[name]).parameters


# exactflow 0.1 wrote these configs; they are read as the builders that replaced them.
def _upgrade(config: dict[str, Any]) -> dict[str, Any]:
    config = dict(config)
    model = config.get("model")
    if model in ("maf", "iaf") and "fast" in config:
        fast = config.pop("fast")
        config["model"] = "iaf" if fast == "sampling" else "maf"
    if model == "nsf" and config.get("kind", "coupling") == "coupling":
        if config.get("fast") == "density":
            config.pop("fast")
        if config.get("permutation") == "reverse":
            config["permutation"] = None
    return config


def build(config: dict[str, Any]) -> Flow:
    """Rebuild a flow from its ``config`` (``{"model": name, **arguments}``).

    Configs written by exactflow 0.1 (``maf`` with ``fast="sampling"``, ``nsf`` couplings
    with ``fast``) build the flows that replaced them, with the same weights.

    Raises:
        ValueError: the model name is unknown or an argument does not fit the builder.
    """
    if not isinstance(config, dict) or "model" not in config:
        raise ValueError("a model config is a dict with a 'model' key naming the builder")
    config = _upgrade(config)
    name = config["model"]
    if name not in _BUILDERS:
        raise ValueError(
            f"unknown model {name!r}; available: {', '.join(available())} (a builder of "
            "your own must be registered with exactflow.models.register before loading)"
        )
    kwargs = {k: v for k, v in config.items() if k != "model"}
    signature = inspect.signature(_BUILDERS[name])
    try:
        signature.bind(**kwargs)
    except TypeError as err:
        takes = [p.name for p in signature.parameters.values()
                 if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
        unknown = [k for k in kwargs if k not in takes]
        near = [f"{k!r}: {', '.join(map(repr, close))}?" for k in unknown
                if (close := difflib.get_close_matches(k, takes, n=2, cutoff=0.6))]
        hint = (f" ({'; '.join(near)})" if near else "") + (
            f"; it takes {', '.join(takes)}" if unknown else "")
        raise ValueError(f"config does not fit the {name!r} builder: {err}{hint}") from None
    return _BUILDERS[name](**kwargs)


def _leading(flow: Flow) -> list[Any]:
    """The flow's first two layers (nested ``Compose`` unrolled), fewer if it has fewer."""
    layers: list[Any] = []
    pending: list[Any] = [flow.transform]
    while pending and len(layers) < 2:
        first = pending.pop(0)
        if isinstance(first, Compose):
            pending = list(first) + pending
        else:
            layers.append(first)
    return layers


def standardize_layer(flow: Flow) -> Standardize | None:
    """The flow's leading :class:`~exactflow.transforms.Standardize` layer, if it has one
    (after a :class:`~exactflow.transforms.Support` layer, which comes first)."""
    layers = _leading(flow)
    if layers and isinstance(layers[0], Support):
        layers = layers[1:]
    return layers[0] if layers and isinstance(layers[0], Standardize) else None


def support_layer(flow: Flow) -> Support | None:
    """The flow's :class:`~exactflow.transforms.Support` layer (``bounds=``), if it has one."""
    layers = _leading(flow)
    return layers[0] if layers and isinstance(layers[0], Support) else None


def with_bounds(flow: Flow, bounds: Any) -> Flow:
    """``flow`` with a :class:`~exactflow.transforms.Support` layer for ``bounds`` before
    its own layers (its parameters shared, not copied): what the flow's builder gives with
    ``bounds=``, for a flow trained on the columns as that layer maps them.

    Raises:
        ValueError: bad ``bounds``, or a flow with a Support layer already.
    """
    limits = bounds_spec(bounds, flow.features)
    if limits is None:
        return flow
    if support_layer(flow) is not None:
        raise ValueError("the flow has a Support layer (bounds) already")
    ref = next((t for t in (*flow.parameters(), *flow.buffers()) if t.is_floating_point()),
               None)
    support = Support(limits, flow.features)
    if ref is not None:
        support = support.to(device=ref.device, dtype=ref.dtype)
    out = Flow(Compose(support, flow.transform), flow.base, context=flow.context_features,
               embedding=flow.embedding, context_scaler=flow.context_scaler)
    if flow.config:
        out.config = {**flow.config, "bounds": limits}
    out.train(flow.training)
    return out
