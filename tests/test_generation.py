"""minillm.generation.generate and the state it leaves behind (issue 25 item 2): the model's train/eval mode.

generate() decodes in eval mode (dropout off, as transformers' generate under model.eval()) and must hand the model
back in the mode it was given: sampling during training (a callback, an eval loop) must not leave the rest of the
run training without dropout, nor switch an eval-mode model to training."""

from __future__ import annotations

import pytest
import torch

from minillm import CausalLM, ModelConfig
from parity import model as pm


def _model(dropout: float = 0.0):
    cfg = ModelConfig.preset("tiny", vocab_size=64, num_hidden_layers=1, pad_token_id=3, eos_token_id=0,
                             attention_dropout=dropout)
    return pm.random_model(cfg, 0)


@pytest.mark.parametrize("train", [True, False])
def test_generate_hands_the_model_back_in_its_mode(train):
    model = _model().train(train)
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    model.generate(ids, max_new_tokens=3)
    assert all(m.training == train for m in model.modules())
    model.generate(ids, max_new_tokens=2, do_sample=True, top_k=5)
    assert all(m.training == train for m in model.modules())


def test_generate_decodes_in_eval_mode_whatever_the_mode_given():
    """With attention dropout on, a train-mode model generates what the eval-mode model generates (dropout off
    while decoding), and is then still in train mode (dropout on again)."""
    model = _model(dropout=0.5)
    ids = torch.tensor([[5, 6, 7, 11, 12]])
    want = model.eval().generate(ids, max_new_tokens=6)
    got = model.train().generate(ids, max_new_tokens=6)
    assert torch.equal(got, want) and model.training
    with torch.no_grad():
        torch.manual_seed(0)
        a = model(ids).logits
        torch.manual_seed(1)
        b = model(ids).logits
    assert not torch.equal(a, b)  # dropout is active again after generate


def test_generate_restores_the_mode_when_decoding_stops_early():
    """Ctrl-C in the chat, or a streamer that raises: the model still comes back in the mode it was given."""
    model = CausalLM(ModelConfig.preset("tiny")).train()

    class Boom:
        def put(self, tokens):
            raise KeyboardInterrupt

        def end(self):
            pass

    with pytest.raises(KeyboardInterrupt):
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, streamer=Boom())
    assert model.training and all(m.training for m in model.modules())
