"""The paper's analyses at our scale, from trained runs to ``reports/<name>/``.

    python -m training.analyses --root runs/fmnist --data fmnist --name fmnist [--only stability,probe]

One module per analysis, each ``run(ctx) -> Section``:

    stability   Table 1: token change / feature cosine similarity under pixel noise, ours (disc and
                VQ) beside a random-init encoder + K-Means control, and the linear probe that
                tells a trained tokenizer from that control
    probe       Figure 3b: linear probe on each stage-1 layer's mean-pooled hidden states
    ablation    Table 3a: a same-size GPT on VQ tokens alone vs DiGIT, class accuracy and FD
    completion  Figure 4b: completions from 12.5-75% of the token rows, disc vs VQ tokenizer

``common`` holds the inputs (paths, images, models, the judge) and the report writer; the VQ-only
baseline is a ``DiGIT`` of a VQ-token config (``training.assemble.vq_model``).
"""
