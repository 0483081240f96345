"""Training methods as a registry of frozen `MethodInfo` records (one module per method family)."""
from vpt_cli.methods.base import MethodInfo, get_method, method_names, register

# Each module registers its methods on import; this order is the order --help lists them in.
# isort: off
from vpt_cli.methods import vpt  # noqa: E402,F401
from vpt_cli.methods import fourier  # noqa: E402,F401
from vpt_cli.methods import baselines  # noqa: E402,F401
# isort: on

__all__ = ["MethodInfo", "get_method", "method_names", "register"]
