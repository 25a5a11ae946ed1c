"""m2d-kernels: fused 2D Matryoshka InfoNCE losses (all layers x all nested dims in one call)."""

from m2d_kernels import schedules
from m2d_kernels.backends import available_backends, backend_status
from m2d_kernels.functional import matryoshka_2d_infonce
from m2d_kernels.losses import Matryoshka2dInfoNCELoss

__version__ = "0.1.0"
__all__ = ["Matryoshka2dInfoNCELoss", "available_backends", "backend_status", "matryoshka_2d_infonce", "schedules",
           "__version__"]
