"""Where the Hydra config tree lives.

An absolute path from this file: Hydra resolves a relative ``config_path`` against the
module name when an app starts from a console script (``pyramidlab-train``), where
``../conf`` is not importable. The project is installed editable, so ``conf/`` sits
beside the packages.
"""

from pathlib import Path

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
