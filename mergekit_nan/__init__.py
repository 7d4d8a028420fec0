"""NAN (norm-aware merging, arXiv 2505.16148) merge methods for mergekit.

Importing this package registers `nan_task_arithmetic`, `nan_ties`, `nan_dare_ties`,
`nan_dare_linear`, `nan_breadcrumbs`, `nan_breadcrumbs_ties`, `nan_della` and
`nan_della_linear` with mergekit. After `pip install`, plain `mergekit-yaml` finds
them without this import (see `_mergekit_nan_hook`).
"""

from mergekit_nan.coefficients import inverse_norm_softmax, nan_weights
from mergekit_nan.methods import NanMergeMethod, register_methods
from mergekit_nan.record import RECORD_FILENAME, recording

__version__ = "0.1.0"

__all__ = [
    "NanMergeMethod",
    "RECORD_FILENAME",
    "inverse_norm_softmax",
    "nan_weights",
    "recording",
    "register_methods",
]
