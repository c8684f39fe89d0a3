"""Put the agent on a board: a venv, the right runtime wheels, a systemd unit and a config.

The pure pieces, each in its module: what board this is (:mod:`.boards`, with the Jetson
L4T to JetPack table), which runtime wheels it gets (:mod:`.packages`), and the text of the
unit and the starter config (:mod:`.unit`, :mod:`.starter_config`). :mod:`.plan` holds
:func:`install` and :func:`uninstall`, which plan their steps from what they read before
changing anything. ``agent/install.sh`` bootstraps a board that has only ``python3`` and
then runs ``edgefleet agent install``.
"""

from .boards import JETPACK_FOR_L4T, Board, detect_board, systemd_booted
from .packages import JETSON_JP6_INDEX_URL, RuntimeWheel, runtime_packages, with_agent_extra
from .plan import (
    InstallOptions,
    InstallReport,
    Layout,
    UninstallOptions,
    UninstallReport,
    install,
    uninstall,
)
from .starter_config import default_device_id, render_config
from .unit import render_unit

__all__ = [
    "JETPACK_FOR_L4T",
    "JETSON_JP6_INDEX_URL",
    "Board",
    "InstallOptions",
    "InstallReport",
    "Layout",
    "RuntimeWheel",
    "UninstallOptions",
    "UninstallReport",
    "default_device_id",
    "detect_board",
    "install",
    "render_config",
    "render_unit",
    "runtime_packages",
    "systemd_booted",
    "uninstall",
    "with_agent_extra",
]
