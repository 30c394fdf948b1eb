"""digit_core.layout: one home for how the stages' sequences are numbered, on numpy and torch alike."""
import numpy as np
import pytest
import torch

from digit_core import layout
from digit_core.config import ConfigError
from digit_core.presets import imagenet_base, tiny


@pytest.mark.parametrize("make", [tiny, imagenet_base])
def test_sequences_follow_the_config_numbers_on_numpy_and_torch(make) -> None:
    c = make()
    s1, s2 = c.stage1, c.stage2
    codes = np.array([[0, 3, 1], [2, 2, 0]])
    first = layout.first_tokens(s1, [1, 0], 2)
    assert first.tolist() == [[s1.class_offset + 1], [s1.class_offset]]
    seq = layout.stage1_input(s1, first, codes[:, :-1])
    assert seq.tolist() == [[s1.class_offset + 1, s1.code_offset, s1.code_offset + 3],
                            [s1.class_offset, s1.code_offset + 2, s1.code_offset + 2]]
    assert torch.equal(layout.stage1_input(s1, torch.from_numpy(first), torch.from_numpy(codes[:, :-1])),
                       torch.from_numpy(seq))
    vq = np.array([[4, 5], [6, 7]])
    row = layout.stage2_input(s2, codes, vq)
    assert row.tolist()[0] == [s2.disc_offset + 0, s2.disc_offset + 3, s2.disc_offset + 1, s2.sep_id, s2.vq_offset + 4]
    assert torch.equal(layout.stage2_input(s2, torch.from_numpy(codes), torch.from_numpy(vq)), torch.from_numpy(row))
    g = s1.gpt
    assert layout.code_slice(g) == slice(g.out_offset, g.out_offset + g.num_out)


def test_null_and_bos_first_tokens() -> None:
    s1 = tiny().stage1
    assert layout.first_tokens(s1, None, 3, null=True).ravel().tolist() == [s1.null_class_id] * 3
    assert layout.first_tokens(s1, None, 2).ravel().tolist() == [s1.bos_id] * 2
    official = imagenet_base().stage1               # trained without label dropout: no null class
    with pytest.raises(ValueError, match="no null class"):
        layout.first_tokens(official, None, 1, null=True)


def test_the_layout_is_named_in_the_config_not_inferred() -> None:
    assert tiny().layout == "ours" and imagenet_base().layout == "fairseq"
    c = tiny()
    c.layout = "sniffed"
    with pytest.raises(ConfigError, match="layout must be one of"):
        c.validate()
