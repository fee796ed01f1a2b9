"""MixDQ in the browser: pick a UNet memory budget, quantize, compare with the float model.

    python app.py                          # the embedded model, http://127.0.0.1:7860
    python app.py --model PATH_OR_HUB_ID --port 8000 --host 0.0.0.0
    MIXDQ_HOST=... MIXDQ_PORT=... python app.py

The app itself is the package mixdq.app (state, text, charts, ui, server); this file is the
documented way to start it from a checkout.
"""
import time

_T_START = time.perf_counter()   # start-up is reported from here, imports included

import sys  # noqa: E402

from mixdq.app import build_app, launch, main, parse_args  # noqa: E402

__all__ = ["build_app", "launch", "main", "parse_args"]   # what `import app` gave before the split

if __name__ == "__main__":
    sys.exit(main(started=_T_START))
