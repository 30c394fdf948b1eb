"""What the tabs share: the bundle registry, turning errors into client messages, the image
input (upload or example thumbnails, the last choice wins) and writing output images."""
from __future__ import annotations

import functools
import inspect
import logging
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from PIL import Image

from digit_core import demo, streaming
from digit_core.images import ImageError
from digit_core.runtime import BundleError, load_bundle

from . import service

log = logging.getLogger("studio")

CSS = """
.pixelated img, .pixelated canvas { image-rendering: pixelated; }
#banner { border-left: 4px solid #d62728; padding-left: 10px; }
.howto { color: #555; font-size: 0.92em; }
.thumbs .grid-container { grid-template-columns: repeat(var(--grid-cols), minmax(0, 1fr)) !important; }
.thumbs .grid-wrap { padding-top: 30px; }
"""
PAPER = "[arXiv:2410.12490](https://arxiv.org/abs/2410.12490)"


class Registry:
    """Opened bundles by name, shared by every user (read-only models; no per-request state).

    A name is ``exported/<folder>`` for every bundle in ``root`` (the project's ``exported/``
    unless ``--bundles`` names another folder), plus the ``--model`` folder's own name when it
    lies elsewhere; clients may open only these."""

    def __init__(self, default: str, device: str, threads: int | None, root: str | Path | None = None) -> None:
        self.default, self.device, self.threads = str(default), device, threads
        self.root = Path(root) if root is not None else demo.EXPORTED
        self._models: dict[str, demo.Model] = {}
        self._lock = threading.Lock()

    def _default_path(self) -> Path:
        default = Path(self.default)
        if not default.is_absolute() and not default.exists():   # "exported/NAME": from the project
            default = demo.PROJECT / default
        return default

    def paths(self) -> dict[str, Path]:
        """Name -> folder of every bundle clients may open. The ``--model`` folder, when it is not
        in ``exported/``, is named by its last part: the selector shows no server directories."""
        found = {f"exported/{Path(p).name}": Path(p) for p in demo.list_bundles(self.root)}
        default = self._default_path()
        if any(p.resolve() == default.resolve() for p in found.values()):
            return found
        return found | {default.name or "model": default}

    def choices(self) -> list[str]:
        return sorted(self.paths())

    def key(self, name: str | None) -> str:
        """The registry name of ``name``: a listed name, a listed folder given as a path, or None
        for the default model."""
        paths = self.paths()
        if name in paths:
            return name
        target = self._default_path() if not name else Path(str(name))
        for k, p in paths.items():
            if target.resolve() == p.resolve():
                return k
        raise ValueError(f"unknown model {str(name)!r:.80}; choose one of {sorted(paths)}")

    def get(self, name: str | None) -> demo.Model:
        key = self.key(name)
        with self._lock:
            if key not in self._models:
                path = self.paths()[key]
                if not (path / "manifest.json").is_file():
                    raise demo.ModelMissing(demo.missing_message(path))
                self._models[key] = demo.Model(path, load_bundle(path, device=self.device, threads=self.threads))
            return self._models[key]

    def try_get(self, name: str | None) -> tuple[demo.Model | None, str | None]:
        """The model, or None and why not (shown as the "no model loaded" banner)."""
        try:
            return self.get(name), None
        except (demo.ModelMissing, BundleError, ValueError) as err:
            log.warning("model %s not loaded: %s", name, err)
            return None, client_text(err)


_REGISTRY: Registry | None = None


def use(registry: Registry) -> None:
    """Make ``registry`` the one the handlers read (one app per process)."""
    global _REGISTRY
    _REGISTRY = registry


def model(name: str | None) -> demo.Model:
    if _REGISTRY is None:
        raise RuntimeError("studio.common.use(registry) was not called")
    return _REGISTRY.get(name)


def registry() -> Registry:
    if _REGISTRY is None:
        raise RuntimeError("studio.common.use(registry) was not called")
    return _REGISTRY


# -- errors: our own words to clients, the details to the server log -----------------------------------
USER_ERRORS = (ValueError, ImageError, BundleError, demo.ModelMissing)
_DIRS = re.compile(r"(?<![\w.~])(?:[A-Za-z]:)?[/\\](?:[^\s/\\:'\"]+[/\\])+")


def client_text(err: BaseException) -> str:
    """An error a user caused, for the client: its message without server directories
    (``/srv/x/exported/fmnist/config.json`` -> ``config.json``)."""
    return _DIRS.sub("", str(err))[:600]


def _to_client(err: BaseException, fn: str) -> gr.Error:
    if isinstance(err, gr.Error):
        return err
    if isinstance(err, USER_ERRORS):
        log.info("%s refused: %s", fn, err)
        return gr.Error(client_text(err), print_exception=False)
    ref = uuid.uuid4().hex[:8]
    log.exception("%s failed (ref %s)", fn, ref)
    return gr.Error(f"Internal error (ref {ref}); the details are in the server log.", print_exception=False)


def handled(fn: Callable) -> Callable:
    """Handlers raise gr.Error only: user errors with our message, anything else as an internal
    error whose traceback goes to the log (clients never see raw exception texts or paths)."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as err:   # noqa: BLE001 - every error becomes a client message
                raise _to_client(err, fn.__qualname__) from None
        return gen

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as err:   # noqa: BLE001
            raise _to_client(err, fn.__qualname__) from None
    return call


# -- output images ---------------------------------------------------------------------------------------
def png(img: np.ndarray) -> str:
    """Write a uint8 image as a PNG file of its own and return its path.

    Gradio would cache a returned array under a name derived from its bytes and rewrite that
    file in place; two requests returning the same image then raced, and one client got a
    file shorter than its Content-Length. A fresh name per output never shares a file."""
    folder = Path(gr.utils.get_upload_folder()) / f"{service.OUTPUT_PREFIX}{uuid.uuid4().hex}"
    folder.mkdir(parents=True)
    path = folder / "image.png"
    Image.fromarray(np.ascontiguousarray(img)).save(path, format="PNG", compress_level=1)
    return str(path)


def gallery(items: list[tuple[np.ndarray, str]]) -> list[tuple[str, str]]:
    return [(png(img), caption) for img, caption in items]


# -- the image a tab works on ------------------------------------------------------------------------
@dataclass
class ImageInput:
    """An upload box, the examples as thumbnails and the chosen example's name (the API input).
    Whatever the user chose last is the one that counts: an upload clears the example, picking an
    example clears the upload."""

    file: gr.File
    thumbs: gr.Gallery
    example: gr.Dropdown
    send: gr.Button

    @property
    def inputs(self) -> list:
        return [self.file, self.example]

    @property
    def components(self) -> list:
        return [self.file, self.thumbs, self.example]

    def on_model(self, m: demo.Model | None) -> dict:
        names = m.example_names() if m else []
        return {self.file: None, self.example: gr.update(choices=names, value=names[0] if names else None),
                self.thumbs: thumbnails(m)}

    def wire(self, model_dd: gr.Dropdown, action: Callable | None = None, outputs: list | None = None,
             inputs: list | None = None) -> None:
        """Keep one choice (the last); then run ``action`` on ``inputs`` (default: the image and
        the model), if given."""
        for event, fn, given, cleared in ((self.file.upload, chose_upload, None, self.example),
                                          (self.thumbs.select, chose_thumbnail, model_dd, [self.example, self.file]),
                                          (self.example.input, chose_example, None, self.file)):
            chosen = event(fn, given, cleared, api_visibility="private")
            if action is not None:
                chosen.then(action, inputs or [*self.inputs, model_dd], outputs, api_visibility="private")


def image_input(m: demo.Model | None) -> ImageInput:
    names = m.example_names() if m else []
    file = gr.File(label="Upload an image", file_types=["image"], height=130)
    # three thumbnails a row fit the column; the CSS keeps a narrower column from cutting the last off
    thumbs = gr.Gallery(thumbnails(m), label="…or pick an example", columns=3, height=300, allow_preview=False,
                        object_fit="contain", elem_classes=["pixelated", "thumbs"], buttons=[])
    example = gr.Dropdown(names, value=names[0] if names else None, label="Example")
    send = gr.Button("Use this image in the other tabs", size="sm")
    return ImageInput(file, thumbs, example, send)


def link(pickers: list[ImageInput]) -> None:
    """Each picker's "use this image in the other tabs" button copies its choice (the upload or
    the example, whichever counts) to every other picker."""
    for src in pickers:
        others = [c for p in pickers if p is not src for c in p.inputs]
        src.send.click(functools.partial(copies, len(others) // 2), src.inputs, others, api_visibility="private")


def copies(n: int, upload: str | None, example: str | None) -> tuple:
    """The pair ``(upload, example)``, ``n`` times over."""
    return (upload, example) * n


def thumbnails(m: demo.Model | None) -> list[tuple[str, str]]:
    """The model's examples as thumbnail files: written once per model and pinned (every page
    shows them for the app's whole life, so the cache sweep keeps them)."""
    if m is None:
        return []

    def make() -> list[tuple[str, str]]:
        items = gallery([(img, name) for name, img in m.examples()[0]])
        service.pin([path for path, _ in items])
        return items
    return list(m.once("thumbnails", make))


def chose_upload() -> None:
    return None          # the example is cleared: the upload counts now


def chose_example() -> None:
    return None          # the upload is cleared


@handled
def chose_thumbnail(model_name: str, evt: gr.SelectData) -> tuple[str, None]:
    """A thumbnail click -> that example's name, and no upload. The index comes from the client,
    so it is checked like any other input."""
    names = model(model_name).example_names()
    i = demo.integer("example index", evt.index if not isinstance(evt.index, list) else evt.index[0], 0, len(names) - 1)
    return names[i], None


# -- a second bundle for the same request ---------------------------------------------------------
NO_COMPARE = "(none)"
COMPARE_NOTE = ("**Compare:** the same request (class, seed, sampling, kept rows, noise) on a second bundle, side by "
                "side. What to look for: DiGIT's discriminative tokens barely move under noise while VQ codes change, "
                "and a completion from a small prefix stays in its class with DiGIT and drifts with VQ tokens.")


def compare_choices() -> list[str]:
    return [NO_COMPARE, *registry().choices()]


def compare_dropdown() -> gr.Dropdown:
    # custom values: API clients may name a listed bundle by its folder path (as for the model)
    return gr.Dropdown(compare_choices(), value=NO_COMPARE, label="Compare with (the same request on another bundle)",
                       allow_custom_value=True)


def second_model(first: demo.Model, name: str | None) -> demo.Model | None:
    """The bundle ``compare_model`` names, or None for no comparison; it must generate the same
    classes from images of the same size, so that one request means the same to both."""
    if name in (None, "", NO_COMPARE):
        return None
    other = model(name)
    a, b = first.config, other.config
    if (a.image_size, list(first.class_names)) != (b.image_size, list(other.class_names)):
        raise ValueError(f"cannot compare {a.name} with {b.name}: they differ in image size or classes")
    return other


def compare_caption(model_name: str | None, compare_name: str | None) -> tuple[dict, dict]:
    """Show the second column and the caption (both models in a line each, and what to look
    for) when a comparison is chosen; hide them otherwise."""
    try:
        first = model(model_name)
        other = second_model(first, compare_name)
    except (*USER_ERRORS,) as err:
        return gr.update(visible=False), gr.update(visible=True, value=f"**Compare:** {client_text(err)}")
    if other is None:
        return gr.update(visible=False), gr.update(visible=False)
    lines = [f"- left: **{first.config.name}**: {demo.model_line(first.config)}",
             f"- right: **{other.config.name}**: {demo.model_line(other.config)}"]
    return gr.update(visible=True), gr.update(visible=True, value=COMPARE_NOTE + "\n" + "\n".join(lines))


def side_by_side(runs: list[Callable], width: int, on_token: Callable[[int, Any], tuple | None],
                 on_done: Callable[[int, Any], tuple], merge: Callable[[dict[int, tuple]], tuple]) -> Iterator[tuple]:
    """Gradio updates for one flow, or two run at once (a comparison), over a tab's outputs: the
    first run owns the first ``width`` outputs, the second the two after them (its grid and
    gallery). ``on_token(i, codes)`` gives run ``i``'s live update of its own outputs (None: none),
    ``on_done(i, result)`` its finished outputs; while the other still runs, a finished run shows
    them. The last message is ``merge(finished)``, every output at once (what an API client's
    ``predict`` returns)."""
    skip = gr.skip()

    def placed(i: int, values: tuple) -> tuple:
        if i == 0:
            return (*values, *(skip,) * (width + 2 - len(values)))
        return (*(skip,) * width, *values, *(skip,) * (2 - len(values)))

    done: dict[int, tuple] = {}
    for i, kind, value in streaming.stream_many(runs):
        if kind == "token":
            update = on_token(i, value)
            if update is not None:
                yield placed(i, update)
            continue
        done[i] = on_done(i, value)
        if len(done) < len(runs):
            yield placed(i, done[i] if i == 0 else done[i][:2])
    yield merge(done)


def wire_compare(compare: gr.Dropdown, model_dd: gr.Dropdown, column: gr.Column | gr.Row, caption: gr.Markdown,
                 galleries: tuple[gr.Gallery, ...] = (), columns: tuple[int, int] = (4, 2)) -> None:
    """Show or hide the second bundle's column and the caption as a comparison is chosen; the
    galleries get ``columns[1]`` thumbnails a row when they share the width, ``columns[0]`` alone."""
    def update(model_name: str | None, compare_name: str | None) -> tuple:
        col, cap = compare_caption(model_name, compare_name)
        n = columns[1] if col["visible"] else columns[0]
        return (col, cap, *(gr.update(columns=n) for _ in galleries))
    for event in (compare.change, model_dd.change):
        event(update, [model_dd, compare], [column, caption, *galleries], api_visibility="private")


def howto(text: str) -> gr.Markdown:
    """The one line under a tab's title that says how to read it."""
    return gr.Markdown(f"**How to read this:** {text}", elem_classes="howto")
