"""NAN (norm-aware merging, arXiv 2505.16148) merge methods for mergekit.

Importing this package registers `nan_task_arithmetic`, `nan_ties`, `nan_dare_ties`,
`nan_dare_linear`, `nan_breadcrumbs`, `nan_breadcrumbs_ties`, `nan_della`,
`nan_della_linear`, `nan_linear` and, where the installed mergekit has the stock
methods, `nan_multislerp` and `nan_nuslerp` with mergekit (0.1.4 or 0.1.5) and hooks the
record and model card into mergekit's merges. After `pip install`, plain
`mergekit-yaml` finds them without this import (see `_mergekit_nan_hook`).

Layout: `core` is NAN itself and imports no mergekit; `adapters` holds one module per
mergekit method-API generation and `adapters.lifecycle`, the one place that patches
mergekit's merge pipeline.
"""

from mergekit_nan.adapters import register_methods
from mergekit_nan.adapters.lifecycle import install_when_loaded
from mergekit_nan.core.coefficients import inverse_norm_softmax, nan_weights
from mergekit_nan.core.record import RECORD_FILENAME
from mergekit_nan.core.session import recording

# The one version string: the build reads it (pyproject [tool.hatch.version]); CHANGELOG.md's top entry matches.
__version__ = "0.3.0"

__all__ = [
    "RECORD_FILENAME",
    "inverse_norm_softmax",
    "nan_weights",
    "recording",
    "register_methods",
]

install_when_loaded()
