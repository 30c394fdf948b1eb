"""GPT: cache decoding equals a full forward, for both stages' layouts and both LN placements."""
import math

import pytest
import torch

from digit_core.config import GPTConfig
from digit_core.presets import imagenet_base, tiny
from digit_core.gpt import GPT


def _cfgs() -> dict[str, GPTConfig]:
    t = tiny()
    small = dict(n_layer=2, n_head=2, d_model=32, d_ff=64)
    return {
        "stage1-preLN": t.stage1.gpt,
        "stage2-prefix": t.stage2.gpt,
        "fairseq-postLN": GPTConfig(vocab_size=40, out_vocab=30, out_offset=5, num_out=25, max_len=20, pos_offset=2,
                                    norm_first=False, final_norm=False, embed_scale=math.sqrt(32), **small),
        "fairseq-stage2": GPTConfig(vocab_size=40, out_vocab=30, out_offset=5, num_out=25, max_len=12, prefix_len=8,
                                    pos_offset=2, norm_first=True, final_norm=True, embed_scale=math.sqrt(32), **small),
    }


@pytest.mark.parametrize("name", list(_cfgs()))
def test_cache_decoding_equals_full_forward(name: str) -> None:
    torch.manual_seed(0)
    cfg = _cfgs()[name]
    model = GPT(cfg).eval()
    L = cfg.context
    idx = torch.randint(0, cfg.vocab_size, (3, L))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(3)
        # prefill a chunk, then one token at a time, as the flows do
        chunk = L // 2
        steps = [model(idx[:, :chunk], 0, cache)]
        for t in range(chunk, L):
            steps.append(model(idx[:, t:t + 1], t, cache))
    dec = torch.cat(steps, 1)
    assert dec.shape == (3, L, cfg.out_vocab)
    assert (dec - full).abs().max().item() <= 1e-5


def test_causality_future_tokens_do_not_change_past_logits() -> None:
    cfg = _cfgs()["stage2-prefix"]
    model = GPT(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.context))
    other = idx.clone()
    other[:, 10:] = torch.randint(0, cfg.vocab_size, (2, cfg.context - 10))
    with torch.no_grad():
        assert torch.equal(model(idx)[:, :10], model(other)[:, :10])


def test_prefix_and_main_use_separate_position_tables() -> None:
    cfg = _cfgs()["fairseq-stage2"]
    model = GPT(cfg)
    table = model.position_table()
    assert table.shape == (cfg.prefix_len + cfg.max_len, cfg.d_model)
    # offset rows (fairseq's padding positions 0 and 1) are never used
    assert torch.equal(table[0], model.pos_prefix[2]) and torch.equal(table[cfg.prefix_len], model.pos_main[2])


def test_post_ln_block_matches_fairseq_order() -> None:
    """post-LN: x = LN1(x + attn(x)); x = LN2(x + mlp(x)), with no final LayerNorm."""
    cfg = _cfgs()["fairseq-postLN"]
    model = GPT(cfg).eval()
    assert model.ln_f is None
    idx = torch.randint(0, cfg.vocab_size, (1, 6))
    with torch.no_grad():
        x = model.tok_emb(idx) * cfg.embed_scale + model.pos_main[2:8]
        mask = torch.tril(torch.ones(6, 6, dtype=torch.bool))
        for b in model.blocks:
            x = b.ln1(x + b.attn(x, mask, None, torch.arange(6)))
            x = b.ln2(x + b.fc2(torch.nn.functional.gelu(b.fc1(x))))
        assert torch.allclose(model.head(x), model(idx), atol=1e-6)


def test_too_long_sequence_is_a_clear_error() -> None:
    cfg = tiny().stage1.gpt
    with pytest.raises(ValueError, match="exceeds the context"):
        GPT(cfg)(torch.zeros(1, cfg.context + 1, dtype=torch.long))


def test_imagenet_base_stage1_has_219m_parameters() -> None:
    with torch.device("meta"):
        n = GPT(imagenet_base().stage1.gpt).num_params()
    assert 205e6 < n < 235e6, n   # the paper's 219M (embedding tables of 9197 rows included)
