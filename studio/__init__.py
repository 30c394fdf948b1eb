"""DiGIT Studio, the Gradio demo over ``digit_core.runtime`` (onnxruntime; never imports torch).

One module per tab, each building its components and owning its handlers at module level
(``generate``, ``explore`` for Tokenize, ``complete``, ``stability``, ``about``); ``common``
holds what they share (the bundle registry, error handling, image inputs, output files) and
``service`` how the app is served (queue limits, Host/Origin checks, the cache sweep).
``app.py`` at the project root is the entry point. The work itself lives in
``digit_core.demo``, the pictures in ``digit_core.viz``.
"""
