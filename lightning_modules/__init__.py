"""pyramidlab's training layer (Lightning modules, entry points).

Importing it filters library noise and registers the ``--help`` resolver (both light: no torch).
"""

from lightning_modules.cli import register_help_resolver
from lightning_modules.console import quiet_libraries

quiet_libraries()
register_help_resolver()
