"""MixDQ in the browser: pick a UNet memory budget, quantize, compare with the float model.

    python app.py                          # the embedded model, http://127.0.0.1:7860
    python app.py --model PATH_OR_HUB_ID --port 8000 --host 0.0.0.0
    MIXDQ_HOST=... MIXDQ_PORT=... python app.py

A thin layer: every number shown comes from the library (`mixdq`, `mixdq.allocate`,
`mixdq.measure`), so the app shows what the command line does.

    state.py   Session: the float model, its sensitivity and allocator, the quantized model,
               and the flow a click runs (allocate -> quantize -> generate and measure)
    text.py    the Markdown it shows: header, budget line, stats table
    charts.py  the SVG charts: bits per layer, size vs predicted loss
    ui.py      the Gradio page: its widgets and what each click runs
    server.py  the command line: flags, launch, main

`build_app(pipe or source)` returns the gr.Blocks for tests and embedding.
"""
import os


def _offline() -> None:
    """No analytics calls, and the local server reachable past any proxy (gradio's launch()
    checks its own URL).  Must happen before gradio is imported, so before the submodules."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    hosts = [h for h in os.environ.get("NO_PROXY", os.environ.get("no_proxy", "")).split(",") if h]
    hosts += [h for h in ("127.0.0.1", "localhost") if h not in hosts]
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = ",".join(hosts)


_offline()

from .server import launch, main, parse_args  # noqa: E402
from .state import Session  # noqa: E402
from .ui import build_app  # noqa: E402

__all__ = ["Session", "build_app", "launch", "main", "parse_args"]
