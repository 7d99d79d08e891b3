"""Run folders: train a model on a table and keep everything about it, as a Python API.

``exactflow train`` calls :func:`train_run`; every other command reads a run back with
:func:`load_run`. A run folder holds::

    RUN_DIR/
      run.json        data source, split, options, metrics, versions (status "done" at the end)
      model.safetensors  the trained flow (exactflow.save: JSON config + weights only;
                      model.pt in run folders of exactflow 0.1)
      data.npz        the train / val / test rows the run used (float64)
      history.json    the training curves
      checkpoint.pt   while training (for resume=True); removed when the run finishes
      report/         index.html, PNG figures, metrics.json (exactflow.report.build_report)
      .exactflow-replacing/  while a run replaces a finished one (overwrite=True): the new
                      run, moved into place once it is done (the old one scores until then)

Every file is written atomically (:mod:`exactflow.io`), so a crash never leaves a half-written
one; ``run.json`` says ``"status": "done"`` only once everything else is in place.

Example:
    >>> import tempfile, exactflow as ef
    >>> from exactflow.runs import train_run
    >>> run = train_run("moons", tempfile.mkdtemp(), model="maf", samples=600, steps=30,
    ...                 progress=False)
    >>> run.info["status"], run.features, sorted(run.info["metrics"]["test"])[:2]
    ('done', 2, ['bpd', 'bpd_se'])
"""

from . import anomaly
from .data import BUILTIN, dequantize, integer_columns, read_data, versions
from .folder import (
    CHECKPOINT_FILE,
    DATA_FILE,
    HISTORY_FILE,
    LEGACY_MODEL_FILE,
    LOCK_FILE,
    MODEL_FILE,
    REPLACING_DIR,
    REPORT_DIR,
    RUN_FORMAT,
    RUN_JSON,
    Run,
    RunError,
    load_run,
    locked,
    run_status,
)
from .pipeline import train_run

__all__ = [
    "Run",
    "RunError",
    "load_run",
    "locked",
    "run_status",
    "train_run",
    "read_data",
    "versions",
    "integer_columns",
    "dequantize",
    "anomaly",
    "BUILTIN",
    "RUN_JSON",
    "MODEL_FILE",
    "LEGACY_MODEL_FILE",
    "DATA_FILE",
    "HISTORY_FILE",
    "CHECKPOINT_FILE",
    "REPORT_DIR",
    "REPLACING_DIR",
    "LOCK_FILE",
    "RUN_FORMAT",
]
