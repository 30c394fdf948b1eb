"""Last step of the training chain: the assembled model directory -> an app bundle.

A thin wrapper over ``digit_core.export`` so the whole chain runs from ``training/``:

    python -m training.export --model runs/fmnist/model --out exported/fmnist
"""
from __future__ import annotations

from digit_core.export import main

if __name__ == "__main__":
    main()
