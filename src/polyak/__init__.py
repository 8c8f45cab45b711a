"""polyak: average neural-network weights.

Polyak–Ruppert averaging of checkpoints from the end of a training run (equal, linearly
or exponentially decreasing weights), online EMA/SWA, post-hoc EMA (choose the EMA width
after training), evaluation sweeps and repair, for
Keras 3 and PyTorch. The core needs numpy only; ``polyak.torch`` and ``polyak.keras`` are
the framework faces and import their framework when you import them.

Example:
    >>> import numpy as np, polyak
    >>> polyak.scheme_weights("exponential", 3, alpha=2.0).round(3).tolist()
    [0.186, 0.307, 0.506]
"""

# First: when this process is the `polyak` command, Ctrl-C during the imports below gives one
# line and exit status 130 rather than a traceback (polyak._startup; a no-op otherwise).
from . import _startup  # noqa: F401
from ._choose.diagnose import AveragingWarning as AveragingWarning
from ._choose.diagnose import Diagnosis as Diagnosis
from ._choose.diagnose import check_results as check_results
from ._choose.diagnose import diagnose as diagnose
from ._choose.posthoc import posthoc_sweep as posthoc_sweep
from ._choose.results import PosthocSweepResults as PosthocSweepResults
from ._choose.results import SweepResults as SweepResults
from ._choose.results import SweepRow as SweepRow
from ._choose.select import Selection as Selection
from ._choose.select import SelectionBiasWarning as SelectionBiasWarning
from ._choose.select import SoupResult as SoupResult
from ._choose.select import greedy_soup as greedy_soup
from ._choose.select import select as select
from ._choose.sweep import Evaluate as Evaluate
from ._choose.sweep import Predict as Predict
from ._choose.sweep import Score as Score
from ._choose.sweep import sweep as sweep
from ._engine.average import AverageResult as AverageResult
from ._engine.average import average as average
from ._engine.average import parse_size as parse_size
from ._engine.inspect import Inspection as Inspection
from ._engine.inspect import inspect as inspect
from ._engine.inspect import save as save
from ._engine.members import order_members as order_members
from ._engine.posthoc import PosthocFitWarning as PosthocFitWarning
from ._engine.posthoc import PosthocPlan as PosthocPlan
from ._engine.posthoc import PosthocResult as PosthocResult
from ._engine.posthoc import plan as posthoc_plan
from ._engine.posthoc import posthoc as posthoc
from ._errors import ConfigError as ConfigError
from ._errors import FormatError as FormatError
from ._errors import MismatchError as MismatchError
from ._errors import NonFiniteError as NonFiniteError
from ._errors import OutputError as OutputError
from ._errors import PolyakError as PolyakError
from ._errors import PolyakWarning as PolyakWarning
from ._errors import SchemeError as SchemeError
from ._errors import UnsafeFileError as UnsafeFileError
from ._schedules import DecaySchedule as DecaySchedule
from ._schedules import make_schedule as make_schedule
from ._schemes import get_scheme as get_scheme
from ._schemes import scheme_names as scheme_names
from ._schemes import scheme_weights as scheme_weights
from ._version import __version__ as __version__
from .formats import open_source as open_source

__all__ = [
    "AverageResult",
    "AveragingWarning",
    "ConfigError",
    "DecaySchedule",
    "Diagnosis",
    "Evaluate",
    "FormatError",
    "Inspection",
    "MismatchError",
    "NonFiniteError",
    "OutputError",
    "PolyakError",
    "PolyakWarning",
    "PosthocFitWarning",
    "PosthocPlan",
    "PosthocResult",
    "PosthocSweepResults",
    "Predict",
    "SchemeError",
    "Score",
    "Selection",
    "SelectionBiasWarning",
    "SoupResult",
    "SweepResults",
    "SweepRow",
    "UnsafeFileError",
    "__version__",
    "average",
    "check_results",
    "diagnose",
    "get_scheme",
    "greedy_soup",
    "inspect",
    "make_schedule",
    "open_source",
    "order_members",
    "parse_size",
    "posthoc",
    "posthoc_plan",
    "posthoc_sweep",
    "save",
    "scheme_names",
    "scheme_weights",
    "select",
    "sweep",
]
