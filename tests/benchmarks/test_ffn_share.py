"""ffn_share.without_ffn: inside it every layer's output is its attention output (FFN and experts skipped,
dense and MoE layers alike); outside it the model is exactly the model again."""

from __future__ import annotations

import torch
from ffn_share import without_ffn

from tests.tiny_moebert import batch, tiny_model


def test_without_ffn_returns_attention_output_and_restores_the_model():
    model = tiny_model("hash-random", moe_layers=(0, 2))  # layer 1 stays dense
    inputs = batch([7, 3, 5])
    with torch.no_grad():
        before = model(**inputs).logits
        attention, outputs = {}, {}
        hooks = [layer.attention.register_forward_hook(lambda m, a, out, i=i: attention.__setitem__(i, out))
                 for i, layer in enumerate(model.base_model.encoder.layer)]  # fmt: skip
        hooks += [layer.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out[0]))
                  for i, layer in enumerate(model.base_model.encoder.layer)]  # fmt: skip
        with without_ffn(model):
            skipped = model(**inputs).logits
        for h in hooks:
            h.remove()
        after = model(**inputs).logits
    for i in range(3):  # layer output == attention output: the [N, d] real tokens of the packed layout
        assert outputs[i].shape == (int(inputs["attention_mask"].sum()), model.config.hidden_size)
        torch.testing.assert_close(outputs[i], attention[i], rtol=0, atol=0)
    assert not torch.allclose(skipped, before)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
