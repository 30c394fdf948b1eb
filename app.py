"""DiGIT Studio: the Gradio demo on an exported bundle (onnxruntime; this app never imports torch).

    python app.py                                # exported/fmnist on 127.0.0.1:7860
    python app.py --model exported/NAME --device cuda --port 7861
    python app.py --host 0.0.0.0 --auth USER:PASSWORD   # reachable from other machines (README, "Security")

Tabs: Generate (live class-conditional sampling), Tokenize (token explorer), Complete (the top
of an image, continued), Stability (tokens under pixel noise, the paper's Table 1), About.
Every action is also an API endpoint: /sample, /tokenize, /complete, /stability (README.md,
"The demo"). The tabs live in the ``studio`` package, the work in ``digit_core.demo``.
"""
from __future__ import annotations

import time

_T0 = time.perf_counter()   # startup is measured from here

import argparse
import atexit
import logging
import os
import signal
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")   # no usage reports unless --analytics

import gradio as gr
from starlette.middleware import Middleware

from digit_core import demo
from digit_core.images import MAX_FILE_BYTES
from studio import about, common, complete, explore, generate, service, stability

log = logging.getLogger("studio")


def summary(m: demo.Model | None, err: str | None = None) -> str:
    if m is None:
        return f"**No model loaded.** {err}"
    c = m.config
    classes = ", ".join(m.class_names) if c.stage1.num_classes else "unconditional"
    tokenizer = ("Tokenizer: the VQGAN's codes (trained to reconstruct pixels), no discriminative encoder"
                 if c.is_vq else demo.encoder_line(c.encoder))
    return (f"**{c.name}** · {c.image_size}×{c.image_size} images · {demo.model_line(c)} · "
            f"{m.flows.provider} · classes: {classes}\n\n{tokenizer}")


def build(registry: common.Registry, analytics: bool = False) -> gr.Blocks:
    """The whole UI over ``registry``'s bundles; the tabs' handlers read that registry."""
    common.use(registry)
    m0, problem = registry.try_get(None)
    # no Gradio delete_cache: it misses files (studio.service explains); service.expire sweeps the cache
    with gr.Blocks(title="DiGIT Studio", analytics_enabled=analytics) as app:
        gr.Markdown(f"# DiGIT Studio\nDiscriminative image tokens + autoregressive generation (NeurIPS 2024, "
                    f"{common.PAPER}).")
        with gr.Row():
            # custom values: API clients may name a listed bundle by its folder path; the registry
            # maps it to its listed name and refuses anything it does not list
            model_dd = gr.Dropdown(registry.choices(), value=registry.key(None), label="Model bundle", scale=1,
                                   allow_custom_value=True)
            banner = gr.Markdown(summary(m0, problem), elem_id="banner" if m0 is None else None)
        with gr.Tab("Generate"):
            gen = generate.build(m0, model_dd)
        with gr.Tab("Tokenize"):
            tok = explore.build(m0, model_dd)
        with gr.Tab("Complete"):
            com = complete.build(m0, model_dd)
        with gr.Tab("Stability"):
            sta = stability.build(m0, model_dd)
        with gr.Tab("About"):
            card = about.build(m0, problem)

        common.link([tok.image, com.image, sta.image])

        def switch(name: str) -> dict:
            """Another bundle: every tab's updates, by component."""
            m, err = registry.try_get(name)
            return ({banner: summary(m, err), card: about.text(m, err)} | generate.on_model(gen, m)
                    | explore.on_model(tok, m) | complete.on_model(com, m) | stability.on_model(sta, m))

        outputs = [banner, card, gen.cls, gen.temperature, gen.top_k, gen.top_p, gen.cfg_scale, gen.plot,
                   *tok.image.components, tok.cluster, *com.image.components, com.cls, com.temperature, com.top_k,
                   com.top_p, *sta.image.components]
        model_dd.change(switch, model_dd, outputs, api_visibility="private").then(
            explore.initial, model_dd, tok.outputs, api_visibility="private").then(
            explore.initial_cluster, model_dd, tok.cluster_outputs, api_visibility="private").then(
            complete.initial, model_dd, com.outputs, api_visibility="private").then(
            stability.initial, model_dd, sta.outputs, api_visibility="private")
        # every tab shows its first example on load (the completion is computed once per model)
        app.load(explore.initial, model_dd, tok.outputs, api_visibility="private")
        app.load(explore.initial_cluster, model_dd, tok.cluster_outputs, api_visibility="private")
        app.load(stability.initial, model_dd, sta.outputs, api_visibility="private")
        app.load(complete.initial, model_dd, com.outputs, api_visibility="private")
    return app


def stop(signum: int, frame: object) -> None:
    """SIGTERM as Ctrl-C: Gradio closes the server, then the exit handlers remove the cache."""
    raise KeyboardInterrupt


def parse_auth(value: str) -> tuple[str, str]:
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise argparse.ArgumentTypeError("--auth takes USER:PASSWORD")
    return user, password


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="DiGIT Studio: the Gradio demo.")
    p.add_argument("--model", default="exported/fmnist",
                   help="bundle folder (default: %(default)s, from the project folder)")
    p.add_argument("--bundles", default=None,
                   help="folder whose bundles the model selectors list (default: the project's exported/)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default %(default)s: this machine only; 0.0.0.0 exposes the app, see README)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime threads per graph (default: all cores)")
    p.add_argument("--concurrency", type=int, default=4, help="requests run at once; the rest queue")
    p.add_argument("--queue-per-client", type=int, default=8,
                   help="jobs one browser session / API client may have queued or running (default %(default)s)")
    p.add_argument("--queue-per-ip", type=int, default=32,
                   help="the same per address, when bound beyond the loopback (default %(default)s)")
    p.add_argument("--cache-ttl", type=int, default=3600,
                   help="seconds uploads and output files are kept (default %(default)s)")
    p.add_argument("--auth", type=parse_auth, default=None, metavar="USER:PASSWORD", help="require a login")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    p.add_argument("--analytics", action="store_true", help="let Gradio send its usage analytics (off by default)")
    a = p.parse_args(argv)
    for name in ("concurrency", "queue_per_client", "queue_per_ip", "cache_ttl"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    cache = service.private_cache()
    atexit.register(service.remove_cache, cache)
    registry = common.Registry(a.model, a.device, a.threads, a.bundles)
    app = build(registry, analytics=a.analytics)
    if registry.try_get(None)[0] is None:
        print(f"warning: {demo.missing_message(a.model)}", file=sys.stderr)
    local = service.is_local_binding(a.host)
    app.queue(default_concurrency_limit=a.concurrency, max_size=16 * a.concurrency)
    service.limit_queue(app, a.queue_per_client, None if local or a.share else a.queue_per_ip)
    service.sweep_forever(cache, every=max(1, a.cache_ttl // 4), age=a.cache_ttl, blocks=app)
    guard = local and not a.share   # a share tunnel arrives with its own Host
    app.launch(server_name=a.host, server_port=a.port, share=a.share, auth=a.auth, max_file_size=MAX_FILE_BYTES,
               show_error=False, css=common.CSS, footer_links=["api", "gradio"], prevent_thread_lock=True, quiet=True,
               app_kwargs={"middleware": [Middleware(service.LocalOnly)]} if guard else None)
    log.info("file cache %s, kept %d s; queue: %d at once, %d waiting at most, %d per client",
             cache, a.cache_ttl, a.concurrency, 16 * a.concurrency, a.queue_per_client)
    print(f"DiGIT Studio ready on http://{a.host}:{a.port} ({time.perf_counter() - _T0:.1f} s after start)", flush=True)
    signal.signal(signal.SIGTERM, stop)   # a plain `kill` closes the server and removes the cache too
    app.block_thread()


if __name__ == "__main__":
    main()
