"""Widgets that re-run an experiment with other parameters.

A widget is never required: each wraps a plain function the notebook also
calls directly, so nbval (which cannot click) still runs every experiment.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def explore(fn: Callable[..., Any], *, description: str = "Run", **controls: Any):
    """Controls for ``fn``'s parameters and a button that runs it and shows the result.

    ``controls`` are ipywidgets abbreviations (``n=(10, 200, 10)``,
    ``jitter=["none", "uniform"]``) or widgets. Returns the widget box.
    """
    import ipywidgets as w  # noqa: PLC0415
    from IPython.display import display  # noqa: PLC0415

    interactive = w.interactive(fn, {"manual": True, "manual_name": description}, **controls)
    display(interactive)
    return interactive


def cluster_status(cluster) -> Any:
    """A small box showing the cluster's services, refreshed by a button."""
    import ipywidgets as w  # noqa: PLC0415
    from IPython.display import display  # noqa: PLC0415

    out = w.HTML(cluster._repr_html_())
    button = w.Button(description="Refresh", icon="refresh")

    def _refresh(_b) -> None:
        out.value = cluster._repr_html_()

    button.on_click(_refresh)
    box = w.VBox([button, out])
    display(box)
    return box
