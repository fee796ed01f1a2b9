"""The app's command line: flags (and MIXDQ_HOST / MIXDQ_PORT), launch, serve until Ctrl-C."""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

_IMPORTED = time.perf_counter()   # start-up is reported from here when the caller has no earlier time

import gradio as gr  # noqa: E402
import torch  # noqa: E402

import mixdq  # noqa: E402
from mixdq.errors import MixDQError, ModelNotFoundError  # noqa: E402

from .ui import CSS, build_app  # noqa: E402


def launch(demo: gr.Blocks, host: str, port: int | None, **kw):
    """Launch with the app's look; allowed_paths lets the browser download exports."""
    session = demo.mixdq_session
    return demo.launch(server_name=host, server_port=port, css=CSS, theme=gr.themes.Default(),
                       allowed_paths=[str(session.workdir)], show_error=True, **kw)


def parse_args(argv=None, prog: str = "python app.py"):
    summary = sys.modules[__package__].__doc__.split("\n\n")[0]
    parser = argparse.ArgumentParser(prog=prog, description=summary)
    parser.add_argument("--model", default=None,
                        help="any source mixdq.load_pipeline accepts: a diffusers folder, a mixdq export "
                             "folder, or a hub id in the local cache (default: the embedded model)")
    parser.add_argument("--host", default=os.environ.get("MIXDQ_HOST", "127.0.0.1"),
                        help="interface to serve on (env MIXDQ_HOST; default 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("MIXDQ_PORT", "7860")),
                        help="port (env MIXDQ_PORT; default 7860)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 for the embedded model, whose tiny matmuls "
                             "only lose to OpenMP barriers with more; torch's default otherwise)")
    return parser.parse_args(argv)


def _float_app(model):
    """The app for a float model, or None (the reason printed) for a source it cannot show."""
    try:
        pipe = mixdq.load_pipeline(model)
        if mixdq.current_plan(pipe.unet):
            print(f"error: {model} is a mixdq export (already quantized), but the app compares a float "
                  "model with its quantized copy: start it on the float model the export came from and "
                  "open the export with 'Export / load > Load & generate', or generate with "
                  f"`python -m mixdq generate --model {model}`", file=sys.stderr)
            return None
        return build_app(pipe)
    except ModelNotFoundError as e:
        from mixdq.planning import plans_without_weights

        hint = (f"; meanwhile `python -m mixdq allocate --model {model} --budget-mb N` plans it without its "
                "weights (published sensitivity and architecture ship)") if plans_without_weights(model) else ""
        print(f"error: {str(e).rstrip('.')}{hint}", file=sys.stderr)
        return None
    except MixDQError as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def main(argv=None, started: float | None = None, prog: str = "python app.py") -> int:
    """Serve the app; `started` (a time.perf_counter() value) is where the printed start-up
    time counts from: `python app.py` passes its first line's, imports included.  `prog` names
    the command in --help (a console script passes its own)."""
    args = parse_args(argv, prog)
    if args.threads is not None or args.model is None:
        torch.set_num_threads(max(1, args.threads or 1))
    demo = _float_app(args.model)
    if demo is None:
        return 2
    launch(demo, args.host, args.port, prevent_thread_lock=True, quiet=True)
    ready = time.perf_counter() - (started if started is not None else _IMPORTED)
    print(f"MixDQ app ready in {ready:.1f} s: http://{args.host}:{args.port}", flush=True)
    try:
        demo.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        shutil.rmtree(demo.mixdq_session.workdir, ignore_errors=True)
    return 0
