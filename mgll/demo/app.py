"""The gradio Blocks page of ``mgll demo``: layout and formatting only, the models live in :mod:`mgll.demo.backend`.

One event, ``/compare`` (also the gradio_client API): file + question + heat-map label in;
status, the image as read, both answers with their option probabilities, one bar chart per
level of the encoder, the heat map and the full result as JSON out. Bad input comes back as a
warning toast plus the status line, never as a traceback; the outputs are cleared so nothing
stale is left next to the message.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no version check, no telemetry

import gradio as gr  # noqa: E402
from PIL import Image  # noqa: E402

from mgll.demo.backend import CompareResult, DemoBackend  # noqa: E402
from mgll.demo.examples import FREE_TEXT_FUNDUS, Example  # noqa: E402
from mgll.demo.inputs import DemoInputError, mcq_preset  # noqa: E402

__all__ = ["build_app", "launch", "theme", "OK_PREFIX", "ERROR_PREFIX"]

log = logging.getLogger(__name__)
OK_PREFIX = "**Done**"  # plain text: headless and server browsers often lack an emoji font
ERROR_PREFIX = "**Cannot compare:**"
PREVIEW_SIZE = 448
MULTILABEL_TOP = 12  # a multi-label level with more labels shows its top LONG_LEVEL_TOP (the JSON keeps all)
LONG_LEVEL_TOP = 5

INTRO = """# MGLL demo: the base MLLM and its MGLL-swapped twin
Same image, same prompt, same scoring; only the vision tower differs. Multiple-choice questions (lines `A. ...`,
`B. ...`) are answered by scoring each option's log-likelihood, as `mgll mcq` does; the bars are the softmax of
those log-likelihoods over the listed options. Any other question is answered by greedy generation.
Below: what the MGLL encoder itself sees, zero-shot over each level of its dataset card, and where in the image
the chosen label's text matches (patch-to-text cosine similarity)."""


def theme() -> gr.themes.Base:
    """gradio's default look with system fonts: the stock theme fetches Google Fonts, and nothing should call out."""
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def _models_md(backend: DemoBackend) -> str:
    b, s, e = backend.base, backend.swapped, backend.encoder
    aligned = f" + projector of `{s.align_dir}`" if s.align_dir else ""
    return (
        f"**Base** `{b.dir}` ({b.host}) · **MGLL-swapped** `{s.dir}`{aligned} ({s.host}) · "
        f"**Encoder** `{e.encoder}` on the levels of `{e.dataset.card.name}`. "
        "Real checkpoints: `mgll demo --base DIR --swapped DIR --encoder RUN`."
    )


def _level_label(backend: DemoBackend, level: str) -> str:
    kind = backend.encoder.tasks[level].kind
    if kind == "multilabel":
        score = "sigmoid per label" if backend.encoder.bias is not None else "softmax; k labels share the mass"
        top = _top_classes(backend, level)
        return f"{level} (multi-label, {score}{f'; top {top}' if top else ''})"
    return f"{level} ({kind}, softmax: sums to 1)"


def _top_classes(backend: DemoBackend, level: str) -> int | None:
    """All bars for single-label levels (they must visibly sum to one) and short multi-label ones."""
    task = backend.encoder.tasks[level]
    return LONG_LEVEL_TOP if task.kind == "multilabel" and len(task.classes) > MULTILABEL_TOP else None


def _preview(image: Image.Image) -> Image.Image:
    view = image.copy()
    view.thumbnail((PREVIEW_SIZE, PREVIEW_SIZE), Image.Resampling.LANCZOS)
    return view


def _answer_md(answer) -> str:
    if answer.probs is None:
        return f"**Answer:** {answer.text}"
    return f"**Answer:** {answer.text} ({answer.probs[answer.text]:.0%})"


def _status_md(r: CompareResult) -> str:
    kind = f"multiple choice, {len(r.options)} options" if r.options else "free text"
    lo, hi = r.heat_range.get("min", 0.0), r.heat_range.get("max", 0.0)
    return (
        f"{OK_PREFIX} ({kind}). Heat map: `{r.heat_level}: {r.heat_label}`, patch cosine {lo:.2f} to {hi:.2f} "
        "(colours stretched over that range)."
    )


def build_app(backend: DemoBackend, examples: list[Example] = ()) -> gr.Blocks:
    levels = backend.encoder.levels
    preset = mcq_preset()

    with gr.Blocks(title="MGLL demo", analytics_enabled=False) as app:
        gr.Markdown(INTRO)
        gr.Markdown(_models_md(backend))
        with gr.Row():
            with gr.Column(scale=1):
                image_in = gr.File(label="Image: PNG / JPEG / TIFF or DICOM (.dcm)", file_count="single", type="filepath",
                                   elem_id="image-input")
                question = gr.Textbox(label="Question", value=preset, lines=8, max_lines=16, elem_id="question")
                with gr.Row():
                    mcq_btn = gr.Button("Ten-disease MCQ preset", size="sm")
                    free_btn = gr.Button("Free text", size="sm")
                heat_label = gr.Dropdown(backend.heat_choices(), value=backend.heat_choices()[0],
                                         label="Heat-map label", elem_id="heat-label")
                compare_btn = gr.Button("Compare", variant="primary", elem_id="compare-btn")
            with gr.Column(scale=1):
                status = gr.Markdown("Upload an image or pick an example, then press **Compare**.", label="status",
                                     elem_id="status")
                preview = gr.Image(label="Image as read", type="pil", format="png", interactive=False, elem_id="preview")
        if examples:
            gr.Examples(
                examples=[[str(e.path), preset if e.question == "mcq" else e.question] for e in examples],
                inputs=[image_in, question],
                example_labels=[e.name for e in examples],
                label="Examples",
            )
        with gr.Row():
            with gr.Column():
                gr.Markdown("### Base MLLM")
                base_md = gr.Markdown(label="base answer", elem_id="base-answer")
                base_probs = gr.Label(label="Option probabilities (base)", show_heading=False, elem_id="base-probs")
            with gr.Column():
                gr.Markdown("### MGLL-swapped MLLM")
                swapped_md = gr.Markdown(label="swapped answer", elem_id="swapped-answer")
                swapped_probs = gr.Label(label="Option probabilities (MGLL-swapped)", show_heading=False,
                                         elem_id="swapped-probs")
        gr.Markdown("### What the MGLL encoder sees")
        with gr.Row():
            heatmap = gr.Image(label="Heat map: patch-to-text similarity", type="pil", format="png",
                               interactive=False, elem_id="heatmap", scale=2)
            with gr.Column(scale=3), gr.Row():  # rows wrap: min_width puts two levels per line
                level_out = [
                    gr.Label(label=_level_label(backend, lv), num_top_classes=_top_classes(backend, lv),
                             show_heading=False, elem_id=f"level-{i}", min_width=320)
                    for i, lv in enumerate(levels)
                ]
        with gr.Accordion("Full result (JSON)", open=False):
            details = gr.JSON(label="result", elem_id="details")

        outputs = [status, preview, base_md, base_probs, swapped_md, swapped_probs, *level_out, heatmap, details]

        def cleared(message: str) -> list:
            return [message, None, "", None, "", None, *([None] * len(level_out)), None, None]

        def run(image, question_text, heat_map_label):
            try:
                r = backend.compare(image, question_text, heat_map_label)
            except DemoInputError as e:
                gr.Warning(str(e))
                return cleared(f"{ERROR_PREFIX} {e}")
            except Exception as e:  # the page gets one line; the console keeps the traceback
                log.exception("mgll demo: request failed")
                msg = f"the server failed on this request ({type(e).__name__}: {e}); details are in its console"
                gr.Warning(msg)
                return cleared(f"{ERROR_PREFIX} {msg}")
            return [
                _status_md(r),
                _preview(r.image),
                _answer_md(r.base),
                r.base.probs,
                _answer_md(r.swapped),
                r.swapped.probs,
                *[lp.probs for lp in r.levels],
                r.heatmap,
                r.to_dict(),
            ]

        compare_btn.click(run, inputs=[image_in, question, heat_label], outputs=outputs, api_name="compare")
        mcq_btn.click(lambda: preset, outputs=question, api_visibility="private")
        free_btn.click(lambda: FREE_TEXT_FUNDUS, outputs=question, api_visibility="private")
    return app


def launch(app: gr.Blocks, server_name: str = "127.0.0.1", port: int | None = None, share: bool = False,
           allowed_paths: list[str | Path] = (), block: bool = True, max_upload_mb: float | None = None):
    """Serve on ``server_name`` (loopback by default); ``block=False`` returns at once (tests, scripts).

    ``max_upload_mb`` is gradio's own cap on an upload, a guard for the disk; keep it above the
    backend's image limit so that files in between get the backend's clearer message.
    """
    return app.launch(
        server_name=server_name,
        server_port=port,
        share=share,
        max_file_size=int(max_upload_mb * 2**20) if max_upload_mb else None,  # bytes: gradio parses no "2.5mb"
        prevent_thread_lock=not block,
        allowed_paths=[str(p) for p in allowed_paths],
        theme=theme(),
        ssr_mode=False,
        mcp_server=False,
        footer_links=["api"],
        show_error=False,
        quiet=not block,
    )
