"""The Gradio page: layout and event wiring over `SessionLogic` (which holds the behaviour).

Left: the image (click two corners to choose a region), what the raster is, the upload box, the band
picker and the examples. Right: the conversation (streamed; reasoning folded as a "thought"), the
task picker, the message box, the GeoJSON download and the cited sources.

Each tab's `ChatSession` lives in `gr.State`, which Gradio keeps per browser session, so users never
see each other's images or chats. Errors the user can fix reach them as a toast (`gr.Warning`) and,
for chat turns, as a message in the conversation; never as a traceback.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from geochat.errors import GeoChatError
from geochat.imagery import SENSOR_PRESETS
from geochat.serving.render import info_markdown, sources_markdown
from geochat.serving.session import AskOptions, ChatSession, SessionLogic

UPLOAD_TYPES = [".tif", ".tiff", ".png", ".jpg", ".jpeg"]
EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"
EXAMPLES = [  # file, task, message
    ("landsat_rgb_utm18.tif", "caption", ""),
    ("landsat_rgb_utm18.tif", "refer", "the island"),
    ("buildings_uint16_utm16.tif", "grounding", "buildings"),
]
TASKS = [
    ("Chat / question", "chat"),
    ("Caption", "caption"),
    ("Classify", "classify"),
    ("Refer: locate a phrase", "refer"),
    ("Grounding: describe with boxes", "grounding"),
    ("Identify a region", "identify"),
]
PLACEHOLDERS = {
    "chat": "Ask about the image, e.g. how many ships are in the harbour?",
    "caption": "Optional: what the caption should focus on",
    "classify": "Optional question; put the options in the box above",
    "refer": "What to locate, e.g. the airport runway",
    "grounding": "Optional: what to describe, e.g. buildings",
    "identify": "Optional: what you want to know about the region",
}
HEADER = """# GeoChat
Chat about satellite and aerial images. **1.** Upload a PNG, JPEG or GeoTIFF (or pick an example).
**2.** Choose a task. **3.** Ask. Boxes are drawn on the image and can be downloaded as GeoJSON."""
CSS = "#image-info { font-size: 0.9em } #status { font-size: 0.85em; opacity: 0.8 }"
SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]


def theme() -> gr.themes.Base:
    """Gradio's Soft theme with system fonts (the default would fetch Google Fonts)."""
    return gr.themes.Soft(font=SYSTEM_FONTS, font_mono=["ui-monospace", "monospace"])


def build_ui(logic: SessionLogic) -> gr.Blocks:
    model_name = logic.gc.model_info.name
    # uploads older than a day are deleted, checked hourly (they can be up to max_upload_bytes each)
    with gr.Blocks(title="GeoChat", analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        state = gr.State(ChatSession())
        gr.Markdown(HEADER + f"\n\nModel: `{model_name}`")
        # Rendered in the right column below, but made first: the examples on the left fill them.
        task = gr.Radio(choices=TASKS, value="chat", label="Task", elem_id="task", render=False)
        message = gr.Textbox(label="Message", placeholder=PLACEHOLDERS["chat"], elem_id="message", lines=1,
                             max_lines=6, render=False)
        with gr.Row():
            with gr.Column(scale=5):
                image = gr.Image(label="Image — click two opposite corners to choose a region", type="pil",
                                 format="png", interactive=False, height=460, elem_id="image-view",
                                 buttons=["download", "fullscreen"])
                info = gr.Markdown("*No image yet.*", elem_id="image-info")
                upload = gr.File(label="Upload PNG, JPEG or GeoTIFF", file_types=UPLOAD_TYPES, type="filepath",
                                 elem_id="upload")
                with gr.Accordion("Bands (multispectral images)", open=False):
                    sensor = gr.Dropdown(
                        choices=[("auto: from the file's metadata", "")]
                        + [(f"{p.name}: {p.description}", p.name) for p in SENSOR_PRESETS.values()],
                        value="", label="Sensor preset", elem_id="sensor")
                    bands = gr.Textbox(label="Custom RGB bands (1-based; overrides the preset)", placeholder="4,3,2",
                                       elem_id="bands")
                    apply_bands = gr.Button("Apply bands", size="sm")
                gr.Examples(examples=[[str(EXAMPLES_DIR / f), t, m] for f, t, m in EXAMPLES if (EXAMPLES_DIR / f).is_file()],
                            inputs=[upload, task, message], label="Examples: click one, then Send")
                similar = gr.Gallery(label="Similar archive images", visible=False, columns=4, height=170)
            with gr.Column(scale=6):
                chatbot = gr.Chatbot(label="Conversation", height=460, elem_id="chat", feedback_options=None,
                                     placeholder="Upload an image or pick an example below, then ask.")
                task.render()
                labels = gr.Textbox(label="Classify options (comma-separated)", visible=False, elem_id="labels",
                                    placeholder="airport, farmland, forest, harbour, residential")
                with gr.Row(visible=False) as region_row:
                    corners = [gr.Number(label=name, precision=1, minimum=0, elem_id=f"region-{name}")
                               for name in ("x1", "y1", "x2", "y2")]
                message.render()
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    reset = gr.Button("Start over", elem_id="start-over")
                    cot = gr.Checkbox(label="Show reasoning (chain of thought)", elem_id="cot")
                status = gr.Markdown("", elem_id="status")
                geojson = gr.DownloadButton("Download the boxes as GeoJSON (EPSG:4326, for a GIS)", visible=False,
                                            elem_id="geojson", size="sm")
                with gr.Accordion("Sources", open=False) as sources_box:
                    sources = gr.Markdown("*No sources yet.*", elem_id="sources")

        # -- handlers: each maps a session to the components it changes ---------------------------

        def shown(session: ChatSession) -> list[Any]:
            """state, image, chatbot, geojson, sources, sources_box, status, 4 region numbers."""
            region = session.region or (None, None, None, None)
            return [
                session, logic.view(session), session.transcript,
                gr.DownloadButton(value=session.geojson_path, visible=session.geojson_path is not None),
                sources_markdown(session.sources) or "*No sources for this answer.*",
                gr.Accordion(label=f"Sources ({len(session.sources)})"), session.status, *region,
            ]

        common = [state, image, chatbot, geojson, sources, sources_box, status, *corners]

        def on_open(previous: ChatSession, path: str | None, sensor_name: str, band_text: str) -> list[Any]:
            try:
                session = logic.open(path, sensor_name, band_text)
            except GeoChatError as exc:  # a typo in the bands or a bad file: what the tab had stays
                gr.Warning(str(exc))
                previous.status = f"⚠️ Could not open the image: {exc}"
                # the preset menu shows the preset in use again, not the one just refused
                return [*shown(previous), gr.skip(), gr.skip(), previous.rendering[0]]
            same_image = session.image_name == previous.image_name
            if previous.transcript and same_image and session.rendering != previous.rendering:
                session.status = "Bands changed: a new conversation starts (the earlier answers saw other bands)."
            text = info_markdown(session.loaded) if session.loaded is not None else "*No image yet.*"
            gallery = gr.Gallery(value=session.similar or None, visible=bool(session.similar))
            return [*shown(session), text, gallery, gr.skip()]

        def on_send(session: ChatSession, text: str, task_name: str, with_cot: bool, label_text: str,
                    *region: float | None) -> Iterator[list[Any]]:
            session = logic.set_region(session, region) if task_name == "identify" else session
            options = AskOptions(task=task_name, cot=with_cot, labels=label_text or "", region=session.region)
            turns = len(session.answers)
            try:
                for update in logic.ask(session, text or "", options):  # updates `session` in place
                    if len(update.answers) > turns:  # the answer is complete: draw its boxes, sources, download
                        yield [*shown(update), ""]
                    else:  # while it streams only the conversation changes (drawing the preview costs 0.1-0.2 s)
                        yield [update, gr.skip(), update.transcript, *[gr.skip()] * (len(common) - 3), ""]
            except GeoChatError as exc:
                gr.Warning(str(exc))
                yield [*shown(session), gr.skip()]

        send_inputs = [state, message, task, cot, labels, *corners]
        # one event for both triggers: Enter then a click on Send while an answer streams runs one turn, not two
        sending = gr.on([send.click, message.submit], on_send, send_inputs, [*common, message], trigger_mode="once")

        # whatever replaces the session (another image, other bands, starting over) first stops the answer
        # being streamed into it, which would otherwise put the old conversation back when it ends
        open_outputs = [*common, info, similar, sensor]
        open_inputs = [state, upload, sensor, bands]
        upload.change(on_open, open_inputs, open_outputs, cancels=[sending])
        apply_bands.click(on_open, open_inputs, open_outputs, cancels=[sending])
        sensor.input(on_open, open_inputs, open_outputs, cancels=[sending])
        bands.submit(on_open, open_inputs, open_outputs, cancels=[sending])

        def on_pick(session: ChatSession, evt: gr.SelectData) -> list[Any]:
            try:
                session = logic.pick(session, float(evt.index[0]), float(evt.index[1]))
            except GeoChatError as exc:
                gr.Warning(str(exc))
            return shown(session)

        image.select(on_pick, [state], common, trigger_mode="always_last")  # a fast second click queues

        def on_region_typed(session: ChatSession, *values: float | None) -> list[Any]:
            # the typed numbers are left as they are (writing the kept region back would wipe a half-typed one)
            return [*shown(logic.set_region(session, values))[: -len(corners)], *[gr.skip()] * len(corners)]

        for box in corners:
            box.input(on_region_typed, [state, *corners], common)

        def on_task(name: str) -> list[Any]:
            return [gr.Textbox(placeholder=PLACEHOLDERS.get(name, "")), gr.Textbox(visible=name == "classify"),
                    gr.Row(visible=name == "identify")]

        task.change(on_task, [task], [message, labels, region_row])

        def on_reset(session: ChatSession) -> list[Any]:
            return shown(logic.reset(session))

        reset.click(on_reset, [state], common, cancels=[sending])
        chatbot.clear(on_reset, [state], common, cancels=[sending])  # the chat's own bin icon starts over too
    demo.queue(default_concurrency_limit=logic.settings.max_concurrent_requests)
    return demo
