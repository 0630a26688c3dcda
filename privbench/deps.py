"""The libraries privbench's built-in components import, and the answer when one is missing.

Every library a built-in component needs is a dependency of the package (``pip install -e .`` or
``pip install privbench`` brings it); ``medmnist``, which only downloads datasets, is the extra
``privbench[medmnist]``. An environment can still lack one (installed with ``--no-deps``, or the
library removed later). A component checks with :func:`require` before it does any work, and the
user gets a :class:`MissingLibrary` error (a ``ConfigError``: ``bench`` exits 2, nothing is run or
stored) whose message ends in the exact command that installs the library, e.g.
``pip install 'snntorch>=0.9'``. The check looks the module up without importing it.
"""

from __future__ import annotations

import importlib.util

from privbench.config import ConfigError

# import name -> the requirement privbench declares for it (pyproject.toml; a test keeps the two in step)
REQUIREMENTS: dict[str, str] = {
    "torch": "torch>=2.2,<2.15",
    "lpips": "lpips>=0.1.4",
    "pytorch_fid": "pytorch-fid>=0.3",
    "opacus": "opacus>=1.5",
    "snntorch": "snntorch>=0.9",
    "tenseal": "tenseal>=0.3",
    "phe": "phe>=1.5",
    "gmpy2": "gmpy2>=2.1",
    "art": "adversarial-robustness-toolbox>=1.17",
    "sklearn": "scikit-learn>=1.3",
    "pandas": "pandas>=2",
    "seaborn": "seaborn>=0.13",
    "medmnist": "medmnist>=3",
}


class MissingLibrary(ConfigError):
    """A library a component needs is not installed; ``command`` installs it.

    Attributes:
        module: the import name that was looked up (``"art"``).
        purpose: what needs it (``"the shadow attack"``).
        command: the shell command that installs it (``pip install 'adversarial-robustness-toolbox>=1.17'``).
    """

    def __init__(self, module: str, purpose: str):
        self.module, self.purpose = module, purpose
        self.command = install_command(module)
        declared = " (it is a dependency of privbench; reinstalling privbench installs it too)" \
            if module in REQUIREMENTS and module != "medmnist" else ""
        super().__init__(f"{purpose} needs the Python module '{module}', which is not installed in this "
                         f"environment{declared}. Install it with: {self.command}")


def install_command(module: str) -> str:
    """The shell command that installs the library providing ``module``, quoted for POSIX shells.

    Example:
        >>> install_command("art")
        "pip install 'adversarial-robustness-toolbox>=1.17'"
    """
    return f"pip install '{REQUIREMENTS.get(module, module)}'"


def missing(module: str) -> bool:
    """True if ``module`` cannot be found (checked without importing it; a module blocked in ``sys.modules``
    counts as missing)."""
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):  # a parent package is missing, or a module without a spec
        return True


def require(module: str, purpose: str) -> None:
    """Raise :class:`MissingLibrary` unless ``module`` is installed.

    Args:
        module: the import name (``"snntorch"``, ``"art"``).
        purpose: what needs it, as the message's subject (``"the gascnn defense"``).

    Raises:
        MissingLibrary: ``module`` cannot be found; the message gives the install command.

    Example:
        >>> require("json", "the store")  # present: returns None
    """
    if missing(module):
        raise MissingLibrary(module, purpose)
