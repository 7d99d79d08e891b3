"""Model builders and their registry.

* :mod:`~exactflow.models.registry`: :func:`register` (a user's builder saves and loads like
  the built-in ones), :func:`build` (a model from its JSON config), :func:`available`;
* :mod:`~exactflow.models.flows`: the built-in flows, :func:`realnvp`, :func:`nice`,
  :func:`maf`, :func:`iaf`, :func:`nsf`, :func:`planar`, :func:`radial`;
* :mod:`~exactflow.models.classical`: the classical models as flows, :func:`gaussian` and
  :func:`gmm`.

Every builder takes ``features`` and the keywords ``standardize``, ``embedding`` and
``base``; the flows with conditioner networks (realnvp, nice, maf, iaf, nsf) also take
``layers``, ``hidden`` and ``context``, planar and radial ``layers`` (they are
unconditional: ``context=0``), and the classical models ``covariance`` and ``context``
(the mixture ``components`` too), with the same names.
"""

from .classical import CLOSED_FORM, gaussian, gmm
from .flows import iaf, maf, nice, nsf, planar, radial, realnvp
from .registry import (
    available,
    build,
    register,
    standardize_layer,
    support_layer,
    takes,
    with_bounds,
)

__all__ = [
    "register",
    "build",
    "available",
    "takes",
    "CLOSED_FORM",
    "standardize_layer",
    "support_layer",
    "with_bounds",
    "realnvp",
    "nice",
    "maf",
    "iaf",
    "nsf",
    "planar",
    "radial",
    "gaussian",
    "gmm",
]
