"""Heavy-tailed data: a normal base against a Student-t base (``base="student"``).

On 3,000 rows of a 2-D Student-t with 1.5 degrees of freedom (independent coordinates),
MAF and NSF with each base, standardized, trained by ``ef.fit``'s defaults in float64:
the test NLL on 5,000 fresh rows and the log-density at far points against the truth.

    python -m benchmarks.tails
"""

from __future__ import annotations

import time

import torch
from scipy import stats

import exactflow as ef

DF = 1.5


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    t = torch.distributions.StudentT(DF)
    x, test = t.sample((3000, 2)).double(), t.sample((5000, 2)).double()
    far = torch.tensor([[1e3, 1e3], [50.0, -20.0], [1e4, 0.0]], dtype=torch.float64)
    truth = stats.t(DF).logpdf(far.numpy()).sum(1)
    true_nll = -stats.t(DF).logpdf(test.numpy()).sum(1).mean()
    print(f"true test NLL {true_nll:.3f}; true log-density at {far.tolist()}: "
          f"{truth.round(1).tolist()}")
    for model in ("maf", "nsf"):
        for base in ("normal", "student"):
            torch.manual_seed(0)
            flow = ef.models.build({"model": model, "features": 2, "base": base,
                                    "standardize": True}).double()
            start = time.perf_counter()
            ef.fit(flow, x, progress=False)
            with torch.no_grad():
                at_far = flow.log_prob(far).numpy().round(1).tolist()
            df = ("" if base == "normal" else
                  f", degrees of freedom {flow.base.df.detach().numpy().round(2).tolist()}")
            print(f"{model}, base={base}: test NLL {ef.evaluate(flow, test)['nll']:.3f}, "
                  f"far {at_far}{df} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
