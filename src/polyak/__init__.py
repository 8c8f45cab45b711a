"""polyak: average neural-network weights.

Polyak–Ruppert averaging of checkpoints from the end of a training run (equal, linearly
or exponentially decreasing weights), online EMA/SWA, evaluation sweeps and repair, for
Keras 3 and PyTorch. The core needs numpy only; ``polyak.torch`` and ``polyak.keras`` are
the framework faces and import their framework when you import them.

Example:
    >>> import numpy as np, polyak
    >>> polyak.scheme_weights("exponential", 3, alpha=2.0).round(3).tolist()
    [0.186, 0.307, 0.506]
"""

from ._average import AverageResult as AverageResult
from ._average import average as average
from ._average import parse_size as parse_size
from ._errors import ConfigError as ConfigError
from ._errors import FormatError as FormatError
from ._errors import MismatchError as MismatchError
from ._errors import NonFiniteError as NonFiniteError
from ._errors import OutputError as OutputError
from ._errors import PolyakError as PolyakError
from ._errors import SchemeError as SchemeError
from ._errors import UnsafeFileError as UnsafeFileError
from ._inspect import Inspection as Inspection
from ._inspect import inspect as inspect
from ._inspect import save as save
from ._members import order_members as order_members
from ._schedules import DecaySchedule as DecaySchedule
from ._schedules import make_schedule as make_schedule
from ._schemes import get_scheme as get_scheme
from ._schemes import scheme_names as scheme_names
from ._schemes import scheme_weights as scheme_weights
from .formats import open_source as open_source

__version__ = "0.1.0"

__all__ = [
    "AverageResult",
    "ConfigError",
    "DecaySchedule",
    "FormatError",
    "Inspection",
    "MismatchError",
    "NonFiniteError",
    "OutputError",
    "PolyakError",
    "SchemeError",
    "UnsafeFileError",
    "__version__",
    "average",
    "get_scheme",
    "inspect",
    "make_schedule",
    "open_source",
    "order_members",
    "parse_size",
    "save",
    "scheme_names",
    "scheme_weights",
]
