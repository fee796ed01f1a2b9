"""The Gradio page: its widgets (`Page`, built by `_controls` and `_results`) and what each
click runs (`Handlers`, which ask the Session and format what it returns)."""
from __future__ import annotations

import functools
import time
import traceback
from dataclasses import dataclass

import gradio as gr

import mixdq
from mixdq import measure
from mixdq.errors import MixDQError
from mixdq.memory import MB

from . import charts, text
from .state import AppError, Session

DISPLAY_PX = 256     # tiny images are shown enlarged (nearest neighbour) so pixels stay honest
CSS = """
#mixdq-title h1 {margin-bottom: 0}
#budget-info {min-height: 3.2em}
#status {min-height: 4.5em}
.mixdq-img img {image-rendering: pixelated}
#run-btn {font-size: 1.1em}
"""


def friendly(fn):
    """Library errors become a clear message in the UI (the outputs keep their last values)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except AppError as e:
            raise gr.Error(str(e), title=e.title) from None
        except (MixDQError, ValueError) as e:
            raise gr.Error(str(e), title=type(e).__name__) from None
        except Exception as e:  # noqa: BLE001 - the app must survive anything and say what happened
            traceback.print_exc()
            raise gr.Error(f"{type(e).__name__}: {e}", title="Unexpected error (details in the terminal)") from None
    return wrapper


def enlarge(image):
    from PIL import Image

    if image is None:
        return None
    factor = max(1, DISPLAY_PX // max(image.size))
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST) if factor > 1 else image


def example_prompts(session: Session, n: int = 5) -> list[str]:
    if session.embedded:
        from mixdq import zoo

        return zoo.heldout_prompts(n)
    return list(session.calibration.prompts[:n])


# ------------------------------------------------------------------------------------------
# The widgets.
# ------------------------------------------------------------------------------------------
@dataclass
class Page:
    header: gr.Markdown
    budget: gr.Slider
    budget_info: gr.Markdown
    preset_buttons: list            # [(gr.Button, presets.Preset)]
    prompt: gr.Textbox
    seed: gr.Number
    steps: gr.Number
    run: gr.Button
    export_btn: gr.Button
    export_file: gr.File
    upload: gr.File
    load_btn: gr.Button
    status: gr.Markdown
    float_img: gr.Image
    quant_img: gr.Image
    overlay: gr.ImageSlider
    diff_img: gr.Image
    stats: gr.Markdown
    chart: gr.HTML
    pareto_chart: gr.HTML
    raw: gr.JSON

    def outputs(self) -> list:
        """What a generate or load click fills, in `Handlers.results`' order."""
        return [self.float_img, self.quant_img, self.overlay, self.diff_img, self.stats, self.chart,
                self.pareto_chart, self.raw, self.status, self.budget, self.budget_info, self.header]


def _preset_buttons(session: Session) -> list:
    if not session.presets:
        gr.Markdown("<small>No presets ship for this model: every budget goes through the allocator.</small>")
        return []
    with gr.Row():
        return [(gr.Button(f"{text.preset_label(p.name)} · {text.fmt_mb(p.size_mb)}", size="sm",
                           elem_id=f"preset-{p.name}"), p) for p in session.presets]


def _controls(session: Session) -> dict:
    """The left column: budget, presets, prompt, seed, steps, the button, export / load."""
    steps_default = int(session.defaults["num_inference_steps"])
    w = {"budget": gr.Slider(label="UNet memory budget (MB)", value=session.default_budget(), elem_id="budget",
                             interactive=True, **session.slider_spec()),
         "budget_info": gr.Markdown(text.budget_markdown(session, session.default_budget()), elem_id="budget-info"),
         "preset_buttons": _preset_buttons(session),
         "prompt": gr.Textbox(label="Prompt", value=example_prompts(session, 1)[0], lines=2, elem_id="prompt")}
    with gr.Row():
        w["seed"] = gr.Number(label="Seed", value=0, precision=0, elem_id="seed")
        w["steps"] = gr.Number(label=f"Steps (model default {steps_default})", value=steps_default, precision=0,
                               elem_id="steps")
    w["run"] = gr.Button("Quantize & generate", variant="primary", elem_id="run-btn")
    gr.Examples([[p] for p in example_prompts(session)], inputs=[w["prompt"]], label="Example prompts")
    with gr.Accordion("Export / load a quantized model", open=False):
        w["export_btn"] = gr.Button("Export quantized model (.zip)", elem_id="export-btn")
        w["export_file"] = gr.File(label="Download", interactive=False, elem_id="export-file")
        w["upload"] = gr.File(label="Load an exported .zip", file_types=[".zip"], elem_id="upload")
        w["load_btn"] = gr.Button("Load & generate", elem_id="load-btn")
    return w


def _images() -> dict:
    """The right column: status, both images, the overlay and difference map, the stats."""
    image = {"type": "pil", "format": "png", "interactive": False, "elem_classes": "mixdq-img"}
    w = {"status": gr.Markdown("Choose a budget and press **Quantize & generate**.", elem_id="status")}
    with gr.Row():
        # PNG, not gradio's default WebP: lossy compression would add its own differences
        w["float_img"] = gr.Image(label="Float", elem_id="float-img", buttons=["download"], **image)
        w["quant_img"] = gr.Image(label="Quantized", elem_id="quant-img", buttons=["download"], **image)
    with gr.Tabs():
        with gr.Tab("Slider overlay"):
            w["overlay"] = gr.ImageSlider(label="float ◀ ▶ quantized (drag)", elem_id="overlay", max_height=300,
                                          **image)
        with gr.Tab("Difference map"):
            w["diff_img"] = gr.Image(label="|quantized − float|, amplified", elem_id="diff-img", height=300, **image)
    w["stats"] = gr.Markdown(elem_id="stats")
    return w


def _layout(session: Session) -> Page:
    header = gr.Markdown(text.header_markdown(session), elem_id="mixdq-title")
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=320):
            controls = _controls(session)
        with gr.Column(scale=3, min_width=420):
            images = _images()
    with gr.Row():
        chart = gr.HTML(elem_id="plan-chart")
        pareto_chart = gr.HTML(elem_id="pareto-chart")
    with gr.Accordion("All measured numbers (JSON)", open=False):
        raw = gr.JSON(elem_id="raw")
    return Page(header=header, chart=chart, pareto_chart=pareto_chart, raw=raw, **controls, **images)


# ------------------------------------------------------------------------------------------
# The clicks.
# ------------------------------------------------------------------------------------------
class Handlers:
    """What each event runs: the Session does the work, under its lock; these format it."""

    def __init__(self, session: Session):
        self.session = session

    def results(self, s: dict, alloc, progress, budget_now) -> tuple:
        """The values of `Page.outputs()` for a measurement of the current quantized model."""
        session, model = self.session, self.session.current
        points = session.pareto_points(alloc, progress)
        diff, gain = measure.difference_map(s["float_image"], s["quant_image"])
        numbers = {k: v for k, v in s.items() if not k.endswith("_image")}
        numbers.update(plan=model.plan.summary(), how=model.how, quantization=model.note, diff_gain=gain,
                       float_mb_total_layer_costs=session.float_mb,
                       plan_mb_layer_costs=model.planned_mb(session.costs))
        f_big, q_big = enlarge(s["float_image"]), enlarge(s["quant_image"])
        diff_shown = gr.update(value=enlarge(diff), label=f"|quantized − float| × {gain:.0f} "
                               f"(white = largest difference, {255 / gain:.0f}/255)")
        rows = charts.plan_chart_data(model.plan, model.pipe.unet)
        return (f_big, q_big, (f_big, q_big), diff_shown, text.stats_markdown(s, model, session.embedded),
                charts.plan_chart_svg(rows, f"Bits per layer: {model.plan.summary()}"), charts.pareto_svg(points),
                numbers, text.done_markdown(s, model), gr.update(**session.slider_spec()),
                text.budget_markdown(session, budget_now) if budget_now is not None else gr.update(),
                text.header_markdown(session))

    def budget_info(self, budget) -> str:
        return text.budget_markdown(self.session, budget)

    @friendly
    def generate(self, budget_mb, prompt_text, seed_v, steps_v, progress=gr.Progress(track_tqdm=True)):
        with self.session.lock:
            t0 = time.perf_counter()
            s, alloc = self.session.generate(budget_mb, prompt_text, seed_v, steps_v, progress, warn=gr.Warning)
            out = self.results(s, alloc, progress, budget_mb)
            progress(1.0, desc=f"done in {time.perf_counter() - t0:.1f} s")
            return out

    @friendly
    def export(self, progress=gr.Progress()):
        with self.session.lock:
            progress(0.2, desc="export: writing the quantized model")
            path = self.session.export()
            gr.Info(f"Exported {path.name} ({path.stat().st_size / MB:.2f} MB)")
            return str(path)

    @friendly
    def load(self, file, prompt_text, seed_v, steps_v, progress=gr.Progress()):
        if file is None:
            raise gr.Error("Choose an exported .zip first.", title="No file")
        path = file if isinstance(file, str) else getattr(file, "name", None) or file.get("path")
        with self.session.lock:
            s = self.session.load(path, prompt_text, seed_v, steps_v, progress)
            return self.results(s, None, progress, None)

    @friendly
    def page_load(self):
        # A known sensitivity (shipped or cached) draws the Pareto chart from the start.  It is
        # solved here, once, after the page shows (about 3 s of ILPs on the embedded model), not
        # while the app starts.
        with self.session.lock:
            return charts.pareto_svg(self.session.pareto_points(ring_current=False))


def _wire(demo: gr.Blocks, page: Page, handlers: Handlers) -> None:
    # One model, one queue: generate, export and load never run at the same time.
    model_queue = {"concurrency_id": "model", "concurrency_limit": 1}
    # The progress bar lives in the status box: the slider, images and charts stay readable.
    shown = {"outputs": page.outputs(), "show_progress_on": [page.status], **model_queue}
    request = [page.budget, page.prompt, page.seed, page.steps]
    demo.load(handlers.page_load, outputs=page.pareto_chart, api_name=False, show_progress="hidden", **model_queue)
    page.budget.change(handlers.budget_info, inputs=page.budget, outputs=page.budget_info, show_progress="hidden",
                       queue=False)
    for btn, p in page.preset_buttons:
        btn.click(lambda p=p: handlers.session.preset_value(p), outputs=page.budget, queue=False)
    page.run.click(handlers.generate, inputs=request, api_name="generate", **shown)
    page.prompt.submit(handlers.generate, inputs=request, api_name=False, **shown)
    page.export_btn.click(handlers.export, outputs=page.export_file, api_name="export", **model_queue)
    page.load_btn.click(handlers.load, inputs=[page.upload, *request[1:]], api_name="load", **shown)


def build_app(model=None, *, sensitivity=None, calibration=None, workdir=None, presets_dir=None) -> gr.Blocks:
    """The Gradio app for a pipeline (or any source `mixdq.load_pipeline` accepts).

    sensitivity / calibration / presets_dir override what the CLI would use (tests pass a
    synthetic table and a short calibration); workdir holds exports and imports."""
    pipe = model if hasattr(model, "unet") else mixdq.load_pipeline(model)
    session = Session(pipe, sensitivity=sensitivity, calibration=calibration, workdir=workdir,
                      presets_dir=presets_dir)
    with gr.Blocks(title="MixDQ") as demo:
        demo.mixdq_session = session
        _wire(demo, _layout(session), Handlers(session))
    demo.queue(default_concurrency_limit=1, max_size=32)
    return demo
