"""The answer lens: its last layer is the model's own output in every family; both lenses are labelled."""

import dataclasses

import pytest
import torch

from flowlib.lens import answer_lens, first_token, layer_distributions, lens_forms, lens_table
from tests.conftest import logits, white_sample

pytestmark = pytest.mark.usefixtures("one_thread")


def make_sample(task="ChooseAttr", qid="q1"):
    """`white_sample` (the input of `white_llava`) with another task or question id."""
    return dataclasses.replace(white_sample(qid=qid), task=task)


def test_final_layer_normed_lens_is_the_models_output(any_tiny):
    loaded = any_tiny
    prepared = loaded.prepare(make_sample())
    output = torch.softmax(logits(loaded, prepared)[0, -1].double(), -1)
    for lens in ("normed", "raw"):
        probs = layer_distributions(loaded, prepared, lens)
        assert probs.shape == (loaded.num_layers, output.shape[0])
        torch.testing.assert_close(probs[-1], output, rtol=0, atol=1e-6)
    normed, raw = layer_distributions(loaded, prepared, "normed"), layer_distributions(loaded, prepared, "raw")
    assert not torch.allclose(normed[0], raw[0])  # the lenses differ below the last layer


def test_answer_lens_table(white_llava):
    loaded, prepared = white_llava
    table = answer_lens(loaded, prepared, lenses=("normed", "raw"))
    assert set(table.lens) == {"normed", "raw"}
    assert set(table.form) == {"answer", "Answer", "false option", "False option"}
    assert len(table) == 2 * 4 * loaded.num_layers
    words = dict(zip(table.form, table.word))
    assert words == {"answer": "red", "Answer": "Red", "false option": "blue", "False option": "Blue"}
    assert dict(zip(table.form, table.token))["Answer"] == "Red"
    last = table[(table.layer == loaded.num_layers - 1)]
    for form, group in last.groupby("form"):  # both lenses agree at the last layer
        assert group.prob.nunique() == 1, form
    output = torch.softmax(logits(loaded, prepared)[0, -1].double(), -1)
    red = first_token(loaded.tokenizer, "red")
    assert abs(last[last.form == "answer"].prob.iloc[0] - float(output[red])) < 1e-6


def test_forms_per_task_and_bad_lens(white_llava):
    loaded, _ = white_llava
    assert set(lens_forms(make_sample("QueryAttr"))) == {"answer", "Answer"}
    assert set(lens_forms(make_sample("ChooseRel"))) == {"answer", "Answer", "false option", "False option"}
    with pytest.raises(ValueError, match="unknown lens"):
        answer_lens(loaded, loaded.prepare(make_sample()), lenses=("logit",))
    table = lens_table(loaded, [make_sample(qid="a"), make_sample("QueryAttr", qid="b")], progress=False)
    assert list(table.question_id.unique()) == ["a", "b"] and set(table.lens) == {"normed"}
