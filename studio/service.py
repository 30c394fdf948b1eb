"""How the app is served: per-client queue limits, Host/Origin checks on a local binding, and a
private, expiring file cache. Gradio does the serving; these close what it leaves open."""
from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import gradio as gr

log = logging.getLogger("studio")

LOCAL_BINDINGS = ("127.0.0.1", "localhost", "::1")


def is_local_binding(host: str) -> bool:
    return host in LOCAL_BINDINGS or _loopback(host)


def _loopback(name: str) -> bool:
    try:
        return ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:
        return False


def local_host_header(value: str) -> bool:
    """A Host header naming this machine's loopback (``localhost``, ``127.0.0.1``, ``[::1]``, any port)."""
    host = urlsplit(f"//{value}").hostname or ""
    return host == "localhost" or host.endswith(".localhost") or _loopback(host)


def local_origin(value: str) -> bool:
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and local_host_header(parts.netloc)


# -- queue limits -----------------------------------------------------------------------------------------
def jobs_of(queue: Any, session: str | None, ip: str | None) -> tuple[int, int]:
    """Jobs waiting or running for ``session`` and for ``ip`` in a Gradio queue."""
    events = [e for q in queue.event_queue_per_concurrency_id.values() for e in q.queue]
    events += [e for jobs in queue.active_jobs if jobs for e in jobs]
    by_session = sum(1 for e in events if session is not None and e.session_hash == session)
    by_ip = sum(1 for e in events if ip is not None and _ip_of(e.request) == ip)
    return by_session, by_ip


def _ip_of(request: Any) -> str | None:
    client = getattr(request, "client", None)
    return getattr(client, "host", None)


def limit_queue(blocks: gr.Blocks, per_session: int, per_ip: int | None) -> None:
    """Refuse a new job from a client that already has ``per_session`` jobs queued or running
    (and, when ``per_ip`` is set, from an address with ``per_ip``), so one client cannot fill the
    queue for everyone. Wraps the queue's ``push``. The refusal takes the form of Gradio's input
    validation answer (HTTP 422), the one form both the browser and gradio_client show in our
    words (a "queue full" 503 reaches gradio_client only as "Queue is full! Please try again.")."""
    queue = blocks._queue
    push = queue.push

    def refuse(message: str):
        return False, [{"__type__": "validate", "is_valid": False, "message": message, "parameter_name": "request"}], \
            "validator_error"

    async def limited(body: Any, request: Any, username: str | None):
        ip = _ip_of(request) if per_ip else None
        mine, from_ip = jobs_of(queue, body.session_hash, ip)
        if mine >= per_session:
            log.warning("refused a job from session %s: %d queued or running", body.session_hash, mine)
            return refuse(f"Too many requests at once: you have {mine} queued or running (the limit is "
                          f"{per_session}); wait for one to finish.")
        if per_ip and from_ip >= per_ip:
            log.warning("refused a job from %s: %d queued or running", ip, from_ip)
            return refuse(f"Too many requests from your address: {from_ip} queued or running (the limit is "
                          f"{per_ip}); wait for one to finish.")
        return await push(body, request, username)

    queue.push = limited


# -- Host and Origin --------------------------------------------------------------------------------------
class LocalOnly:
    """ASGI middleware for an app bound to the loopback: answer only requests whose Host is a
    local name (a web page that rebinds its own DNS name to 127.0.0.1 sends its own name), and
    refuse requests from another origin (a page elsewhere posting an upload to localhost)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            why = None
            if not local_host_header(headers.get("host", "")):
                why = "Host not allowed: this app is bound to the loopback and answers only to localhost/127.0.0.1"
            elif "origin" in headers and not local_origin(headers["origin"]):
                why = "Cross-origin request refused: this app only answers pages it served itself"
            if why:
                log.warning("refused %s %s (host %r, origin %r)", scope.get("method", "WS"), scope.get("path"),
                            headers.get("host"), headers.get("origin"))
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                await send({"type": "http.response.start", "status": 403,
                            "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
                await send({"type": "http.response.body", "body": why.encode()})
                return
        await self.app(scope, receive, send)


# -- the file cache ---------------------------------------------------------------------------------------
# Gradio's own ``delete_cache`` is not enough: it deletes only the files it registered with a
# component rendered in the page. When a handler sends a component an update in a session (every
# ``gr.skip()`` a generation yields for its gallery while stage 1 streams, every ``gr.update``),
# Gradio gives that session its own unrendered copy of the component, and the files the copy
# postprocesses later (the finished gallery) are registered with the copy only: they were never
# deleted (the /sample and /complete galleries piled up). So the app expires files by age itself,
# over its whole private folder, keeping only the files a page shows for the app's whole life.
_PINNED: set[str] = set()
OUTPUT_PREFIX = "out-"   # common.png writes each output image in a folder of its own


_STRAYS: list[Path] = []   # folders Gradio made for itself beside the cache, removed at exit when empty


def private_cache(base: str | None = None) -> Path:
    """A fresh cache folder of this app's own (under ``GRADIO_TEMP_DIR`` or the system temp dir),
    set as Gradio's, so sweeping it never touches another app's files; removed at exit."""
    root = Path(base or os.environ.get("GRADIO_TEMP_DIR") or tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="digit-studio-", dir=root))
    os.environ["GRADIO_TEMP_DIR"] = str(folder)
    # Gradio read the temp dir when it was imported and makes this folder there (for its "vibe
    # edit" mode, which the app does not use); one that was not there before is removed at exit
    stray = root / "vibe_edit_history"
    if not stray.exists():
        _STRAYS.append(stray)
    return folder


def pin(paths: list[str]) -> None:
    """Files made once and shown for the app's whole life (each model's example thumbnails):
    never expired."""
    _PINNED.update(str(Path(p).resolve()) for p in paths)


def kept_by_gradio(blocks: Any) -> set[str]:
    """The files Gradio keeps for the page itself (components' initial values: ``keep_in_cache``)."""
    kept: set[str] = set()
    for block in list(getattr(blocks, "blocks", {}).values()):
        kept.update(str(Path(p).resolve()) for p in getattr(block, "keep_in_cache", ()))
    return kept


def expire(folder: Path, age: float, blocks: Any = None, now: float | None = None) -> int:
    """Delete every file under ``folder`` created more than ``age`` seconds ago (by ctime, as
    Gradio ages its files), except the pinned ones and those Gradio keeps for the page; drop them
    from Gradio's lists of files it made (``temp_file_sets``), so those do not grow; then remove
    the empty sub-folders older than ``age``. Returns how many files went. (``now``: the clock,
    for tests.)"""
    keep = _PINNED | (kept_by_gradio(blocks) if blocks is not None else set())
    now, gone = time.time() if now is None else now, []
    # listed first, then deleted (a folder removed under a lazy listing would end it); os.walk
    # skips folders that vanish while it lists
    for f in [Path(d, name) for d, _, names in os.walk(folder) for name in names]:
        try:
            if now - f.lstat().st_ctime <= age or str(f.resolve()) in keep:
                continue
            f.unlink()
            gone.append(f)
            if f.parent.name.startswith(OUTPUT_PREFIX):   # an output's own folder (never reused): goes with it
                f.parent.rmdir()
        except OSError:   # already gone (or in use by a delete elsewhere)
            continue
    if blocks is not None and gone:
        names = {str(f) for f in gone} | {os.path.abspath(f) for f in gone}
        for files in list(getattr(blocks, "temp_file_sets", [])):
            files.difference_update(names)
    prune_empty_dirs(folder, age, now)
    return len(gone)


def prune_empty_dirs(folder: Path, age: float, now: float | None = None) -> int:
    """Remove the empty sub-folders (one per output or upload) older than ``age`` seconds; how
    many went."""
    gone, now = 0, time.time() if now is None else now
    for d in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        try:
            if now - d.stat().st_mtime > age and not any(d.iterdir()):
                d.rmdir()
                gone += 1
        except OSError:   # in use again, or already gone
            continue
    return gone


def sweep_forever(folder: Path, every: float, age: float, blocks: Any = None) -> threading.Thread:
    """``expire(folder, age, blocks)`` every ``every`` seconds, in a daemon thread."""
    def run() -> None:
        while True:
            time.sleep(every)
            try:
                expire(folder, age, blocks)
            except Exception:   # noqa: BLE001 - the sweep must outlive one bad pass
                log.exception("cache sweep failed")

    t = threading.Thread(target=run, daemon=True, name="digit-cache-sweep")
    t.start()
    return t


def remove_cache(folder: Path) -> None:
    """Remove the app's cache folder, and the empty folders Gradio made beside it for itself."""
    shutil.rmtree(folder, ignore_errors=True)
    for stray in _STRAYS:
        with contextlib.suppress(OSError):
            stray.rmdir()   # only when empty: nothing of anyone's is deleted
