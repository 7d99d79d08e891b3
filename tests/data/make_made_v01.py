"""Freeze exactflow 0.1 MADE / MAF state dicts and their outputs into made_v01.pt.

Run from the repository root with exactflow 0.1 (commit d37b829) installed:
``python tests/data/make_made_v01.py``. Kept to show how the fixture was made; the tests
only read the file.
"""
import torch

import exactflow as ef
from exactflow.nn import MADE
from tests.helpers import perturb

torch.manual_seed(0)
out = {"flows": {}, "mades": {}}
flows = {
    "maf": (dict(model="maf", features=3, layers=2, hidden=(5, 4), context=2), 2),
    "iaf": (dict(model="iaf", features=2, layers=2, hidden=(3,)), 0),
    "nsf_ar": (
        dict(model="nsf", features=4, layers=2, hidden=(6,), bins=3, kind="autoregressive"), 0
    ),
}
for name, (cfg, c) in flows.items():
    cfg = dict(cfg)
    model = cfg.pop("model")
    flow = getattr(ef.models, model)(**cfg).double()
    perturb(flow, scale=0.3, seed=len(name))
    x = torch.randn(6, cfg["features"], dtype=torch.float64)
    ctx = torch.randn(6, c, dtype=torch.float64) if c else None
    with torch.no_grad():
        lp = flow.log_prob(x, ctx)
        z, ladj = flow.transform(x, ctx)
        xb, lb = flow.transform.inverse(z, ctx)
    out["flows"][name] = dict(model=model, kwargs=cfg, state=flow.state_dict(), x=x, context=ctx,
                              log_prob=lp, z=z, ladj=ladj, x_back=xb, ladj_back=lb)
mades = {
    "random_ctx": dict(features=5, outputs=2, hidden=(7, 6), context=3, order="random", seed=4),
    "reverse_nohidden": dict(features=4, outputs=3, hidden=(), order="reverse"),
    "one_feature": dict(features=1, outputs=2, hidden=(3,)),
    "one_feature_ctx": dict(features=1, outputs=2, hidden=(3,), context=2),
    "narrow": dict(features=6, outputs=1, hidden=(3, 8), order=[2, 0, 5, 1, 4, 3]),
}
for name, kw in mades.items():
    made = perturb(MADE(**kw, zero_last=False).double(), scale=0.3, seed=len(name))
    x = torch.randn(5, kw["features"], dtype=torch.float64)
    ctx = torch.randn(5, kw.get("context", 0), dtype=torch.float64) if kw.get("context") else None
    with torch.no_grad():
        params = made(x, ctx)
    kw = {k: (v if not isinstance(v, tuple) else list(v)) for k, v in kw.items()}
    out["mades"][name] = dict(kwargs=kw, state=made.state_dict(), x=x, context=ctx, params=params)
torch.save(out, "tests/data/made_v01.pt")
print({k: list(v["state"].keys())[:4] for k, v in out["mades"].items()})
print({k: list(v["state"].keys())[:6] for k, v in out["flows"].items()})
