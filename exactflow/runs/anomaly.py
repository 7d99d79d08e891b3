"""Anomaly flags that mean what they say: conformal p-values against held-out rows.

A row's log-density alone says little (is -12 nats unusual?); its rank among the
log-densities of rows the model never trained on says exactly that. With ``n`` calibration
rows held out of training (a run's validation and test splits), the conformal p-value of a
new row with log-density ``s`` is

    p = (1 + #{calibration rows with log-density <= s}) / (n + 1)

If the new row and the calibration rows are exchangeable (drawn from the same
distribution, independently of the fitted model), ``P(p <= q) <= q`` for every ``q``, and
about ``q`` for continuous scores (the validation rows chose the model and its stopping
step, a mild departure from independence that ``benchmarks/anomaly.py`` measures): flagging
rows with ``p <= q`` raises false alarms on ``q`` of new normal data, within binomial
error (Vovk, Gammerman & Shafer, Algorithmic Learning in a Random World, 2005; Laxhammar &
Falkman 2015 for anomaly detection). Rows
scored ``-inf`` (outside the model's support, or beyond the range of its dtype) get the
smallest p-value and are always flagged.

The training rows' own log-densities are optimistic (the model was fitted to them): a
threshold taken from them flags far more than ``q`` of new normal rows.
"""

from __future__ import annotations

import numpy as np

from ..validation import fraction, warn_user

__all__ = ["p_values", "flag", "flag_rate", "flag_rate_range", "smallest_p_value"]


def p_values(scores: np.ndarray, calibration: np.ndarray) -> np.ndarray:
    """Conformal p-values of ``scores`` (log-densities) against ``calibration`` scores.

    Non-finite calibration scores count as ``-inf`` (a NaN never occurs: see
    :func:`exactflow.scoring.log_prob`). Cost O((m + n) log n).

    Example:
        >>> import numpy as np
        >>> p_values(np.array([-10.0, 0.0, 10.0]), np.array([-1.0, 1.0, 2.0, 3.0]))
        array([0.2, 0.4, 1. ])
    """
    cal = np.sort(np.where(np.isnan(calibration), -np.inf, calibration))
    s = np.where(np.isnan(scores), -np.inf, np.asarray(scores, dtype=np.float64))
    at_or_below = np.searchsorted(cal, s, side="right")
    return (1.0 + at_or_below) / (len(cal) + 1.0)


def smallest_p_value(calibration_rows: int) -> float:
    """The smallest conformal p-value ``m`` calibration rows can give, ``1 / (m + 1)``: a
    threshold below it flags no row with a finite log-density."""
    return 1.0 / (int(calibration_rows) + 1.0)


def _cut(calibration_rows: int, q: float, distinct: int | None) -> tuple[int, int]:
    """``(j, M)``: new rows are flagged below the ``j``-th lowest of ``M`` distinct
    calibration scores (``j = 0``: none). With ``m`` rows, ``k = floor(q (m + 1))``; where
    the ``m`` rows are ``M`` distinct ones with ``c = m / M`` copies each (copies score
    alike), the cut is the ``floor((k - 1) / c) + 1``-th distinct score."""
    m = int(calibration_rows)
    k = int(np.floor(q * (m + 1) + 1e-9))
    if k == 0 or distinct is None or distinct >= m:
        return k, m
    return int((k - 1) // (m / distinct)) + 1, int(distinct)


def flag_rate(calibration_rows: int, q: float, distinct: int | None = None) -> float:
    """The share of new normal rows (exchangeable with the calibration rows) that
    :func:`flag` flags at ``q``: p-values are multiples of ``1 / (m + 1)``, so it is
    ``floor(q (m + 1)) / (m + 1)``, at most ``q`` (30 rows and ``q = 0.06``: 1/31, 3.2%).
    ``distinct``: the calibration rows are that many distinct rows and their copies (120
    rows, 30 distinct, at ``q = 0.05``: 2/31, 6.5%)."""
    j, m = _cut(calibration_rows, q, distinct)
    return j / (m + 1)


def flag_rate_range(calibration_rows: int, q: float, level: float = 0.9,
                    distinct: int | None = None) -> tuple[float, float]:
    """Where the share of new normal rows flagged at ``q`` lies, for ``level`` of the sets of
    ``m`` calibration rows a run may hold out: the threshold is the ``k``-th lowest of their
    log-densities, ``k = floor(q (m + 1))``, so the share is ``Beta(k, m + 1 - k)``
    (continuous scores; with copies, ``distinct`` as in :func:`flag_rate`, that of the cut
    among the distinct rows). :func:`flag_rate` is its mean; 600 rows at ``q = 0.05`` put
    9 runs in 10 between 3.6% and 6.5%.

    Example:
        >>> [round(v, 3) for v in flag_rate_range(600, 0.05)]
        [0.036, 0.065]
    """
    from scipy.stats import beta

    j, m = _cut(calibration_rows, q, distinct)
    if j == 0:
        return 0.0, 0.0
    lo, hi = beta.ppf([(1 - level) / 2, (1 + level) / 2], j, m + 1 - j)
    return float(lo), float(hi)


def flag(scores: np.ndarray, calibration: np.ndarray, q: float) -> tuple[np.ndarray, np.ndarray]:
    """``(p_values, flags)``: rows whose p-value is at most ``q``, and every ``-inf`` row.

    Warns when ``q`` is below the smallest p-value the calibration rows allow: then only
    rows scored ``-inf`` are flagged.
    """
    q = fraction(q, "q")
    floor = smallest_p_value(len(calibration))
    if q < floor:
        warn_user(
            f"with {len(calibration)} held-out rows the smallest p-value is "
            f"1/{len(calibration) + 1} = {floor:.3g}, so a threshold of {q:g} flags only "
            f"rows scored -inf; use one of at least {floor:.3g}, or hold out more rows"
        )
    p = p_values(scores, calibration)
    return p, (p <= q) | ~np.isfinite(scores)
