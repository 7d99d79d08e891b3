"""Running moments: means and variances merged chunk by chunk, in float64.

One home for Chan, Golub & LeVeque's pairwise update, used wherever data are summarized
in pieces: column statistics of a memory-mapped table (:class:`exactflow.transforms.Standardize`),
the test NLL and its standard error over batches (:func:`exactflow.evaluate`), and the
validation NLL combined across processes in data-parallel training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["RunningMoments"]


@dataclass
class RunningMoments:
    """Count, mean and sum of squared deviations of a stream of rows, in float64.

    ``update(block)`` adds the rows of a ``(n,)`` or ``(n, d)`` block; ``merge(other)`` adds
    another summary. Both use the pairwise update (Chan et al. 1979), exact up to float64
    rounding whatever the chunking, and stable when the mean is large against the spread.

    Example:
        >>> import numpy as np
        >>> m = RunningMoments()
        >>> for part in np.array_split(np.arange(10.0), 3):
        ...     _ = m.update(part)
        >>> m.count, float(m.mean), round(float(m.var(ddof=1)), 6)
        (10, 4.5, 9.166667)
    """

    count: int = 0
    mean: Any = 0.0
    m2: Any = 0.0

    def update(self, block: Any) -> RunningMoments:
        """Add the rows of ``block`` (a 1-D or 2-D array); returns ``self``."""
        b = np.asarray(block, dtype=np.float64)
        n = int(b.shape[0]) if b.ndim else 1
        if n == 0:
            return self
        mean = b.mean(axis=0)
        m2 = ((b - mean) ** 2).sum(axis=0)
        return self.merge(RunningMoments(n, mean, m2))

    def merge(self, other: RunningMoments) -> RunningMoments:
        """Add another summary (the pairwise update); returns ``self``."""
        if other.count == 0:
            return self
        if self.count == 0:
            self.count, self.mean, self.m2 = other.count, other.mean, other.m2
            return self
        total = self.count + other.count
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (other.count / total)
        self.m2 = self.m2 + other.m2 + delta * delta * (self.count * other.count / total)
        self.count = total
        return self

    def var(self, ddof: int = 0) -> Any:
        """The variance (``ddof=0``: population; 1: sample); NaN when undefined."""
        if self.count - ddof <= 0:
            return np.full(np.shape(self.mean), math.nan) if np.ndim(self.mean) else math.nan
        return self.m2 / (self.count - ddof)

    def std(self, ddof: int = 0) -> Any:
        """The standard deviation, ``sqrt(var(ddof))``."""
        return np.sqrt(self.var(ddof))

    def standard_error(self) -> float:
        """The standard error of the mean, ``sd / sqrt(n)`` with the sample sd; NaN if n < 2."""
        if self.count < 2:
            return math.nan
        return float(math.sqrt(float(self.var(ddof=1)) / self.count))
