"""A console worth reading: library noise filtered, the config shown resolved, both kept in train.log.

Importing :mod:`lightning_modules` calls :func:`quiet_libraries` (stdlib only: ``--help`` stays fast).
"""

from __future__ import annotations

import io
import logging
import warnings
from typing import Any

# Messages that tell a user nothing about the run (Lightning's tips and adverts).
NOISE = ("💡 Tip:", "litlogger", "LitLogger", "Trainer already configured with model summary callbacks")
OWN_MODULES = r"(?!(?:detection|smsl|srfgan|lightning_modules|hydra_plugins|tests)(?:\.|$))"


class DropNoise(logging.Filter):
    """Drops log records whose message contains one of :data:`NOISE`."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(n in msg for n in NOISE)


def quiet_libraries() -> None:
    """Filter dependencies' deprecation warnings and Lightning's tips; our own warnings stay."""
    for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=OWN_MODULES)
    # the loaders of the embedded data run in the main process on purpose in tests and debug configs
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    # frozen stages and norm_eval BatchNorms are in eval mode at fit start by design (detection/backbones.py)
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropNoise) for f in logger.filters):
            logger.addFilter(DropNoise())


def to_text(renderable: Any, width: int = 120) -> str:
    """A Rich renderable (tree, table) as plain text."""
    from rich.console import Console

    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None, force_terminal=False).print(renderable)
    return buf.getvalue()


def echo_to_log(renderable: Any, title: str = "") -> None:
    """Write a rendered tree or table into the log files (``train.log``) only: the console already shows it."""
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    if not handlers:
        return
    text = (title + "\n" if title else "") + to_text(renderable).rstrip()
    record = logging.LogRecord("pyramidlab", logging.INFO, __file__, 0, text, None, None)
    for h in handlers:
        h.handle(record)


def _yaml(value: Any) -> str:
    """A config node as YAML, resolved (real paths); a node that cannot be resolved yet (the run
    folder before a sweep's jobs exist) is shown as written."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if not isinstance(value, DictConfig | ListConfig):
        return str(value)
    try:
        return OmegaConf.to_yaml(value, resolve=True)
    except Exception:  # noqa: BLE001 - an interpolation only a job can resolve
        out = []
        for key in value:
            try:
                out.append(OmegaConf.to_yaml(OmegaConf.masked_copy(value, [key]), resolve=True))
            except Exception:  # noqa: BLE001
                node = value._get_node(key)
                out.append(f"{key}: {node._value() if node is not None else '???'}\n")
        return "".join(out)


def config_tree(cfg: Any, title: str) -> Any:
    """The config as a Rich tree, one branch per top-level key, values resolved where possible."""
    from omegaconf import DictConfig
    from rich.syntax import Syntax
    from rich.tree import Tree

    tree = Tree(f"[bold]{title}")
    for key in cfg:
        if key == "hydra":
            continue
        value = cfg._get_node(key) if isinstance(cfg, DictConfig) else cfg[key]
        branch = tree.add(f"[bold cyan]{key}")
        try:
            text = _yaml(cfg[key])
        except Exception:  # noqa: BLE001 - a top-level scalar interpolation only a job can resolve
            text = str(value._value()) if hasattr(value, "_value") else str(value)
        # word_wrap: a long path is wrapped, not cut at the terminal width
        branch.add(Syntax(text.rstrip(), "yaml", theme="ansi_dark", background_color="default", word_wrap=True))
    return tree


def show_config(cfg: Any, title: str, console: Any = None, in_multirun: bool = False) -> None:
    """Print the config tree once per run: a sweep's jobs only write it to their log file (the sweep
    printed it when it started; each job's own copy is in its ``.hydra/config.yaml``)."""
    tree = config_tree(cfg, title)
    if not in_multirun:
        if console is None:
            from rich.console import Console

            console = Console()
        console.print(tree)
    echo_to_log(tree)
