"""The answer lens: its last layer is the model's own output; both lenses are labelled."""

import pytest
import torch
from PIL import Image

from flowlib.lens import answer_lens, first_token, layer_distributions, lens_forms, lens_table
from flowlib.sample import Box, Sample
from flowlib.tiny import tiny_llava

FAMILIES = ("llava-1.5", "llava-next")


pytestmark = pytest.mark.usefixtures("one_thread")


def make_sample(task="ChooseAttr", qid="q1"):
    return Sample(
        qid,
        "is the star red or blue?",
        "red",
        task,
        image=Image.new("RGB", (160, 120), "white"),
        true_option="red",
        false_option="blue",
        central_object="star",
        boxes=[Box(10, 20, 50, 60)],
    )


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    loaded = tiny_llava(request.param)
    return loaded, loaded.prepare(make_sample())


def test_final_layer_normed_lens_is_the_models_output(tiny):
    loaded, prepared = tiny
    with torch.no_grad():
        output = torch.softmax(loaded.model(**prepared.inputs).logits[0, -1].double(), -1)
    for lens in ("normed", "raw"):
        probs = layer_distributions(loaded, prepared, lens)
        assert probs.shape == (loaded.num_layers, output.shape[0])
        torch.testing.assert_close(probs[-1], output, rtol=0, atol=1e-6)
    normed, raw = layer_distributions(loaded, prepared, "normed"), layer_distributions(loaded, prepared, "raw")
    assert not torch.allclose(normed[0], raw[0])  # the lenses differ below the last layer


def test_answer_lens_table(tiny):
    loaded, prepared = tiny
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
    with torch.no_grad():
        output = torch.softmax(loaded.model(**prepared.inputs).logits[0, -1].double(), -1)
    red = first_token(loaded.tokenizer, "red")
    assert abs(last[last.form == "answer"].prob.iloc[0] - float(output[red])) < 1e-6


def test_forms_per_task_and_bad_lens(tiny):
    loaded, _ = tiny
    assert set(lens_forms(make_sample("QueryAttr"))) == {"answer", "Answer"}
    assert set(lens_forms(make_sample("ChooseRel"))) == {"answer", "Answer", "false option", "False option"}
    with pytest.raises(ValueError, match="unknown lens"):
        answer_lens(loaded, loaded.prepare(make_sample()), lenses=("logit",))
    table = lens_table(loaded, [make_sample(qid="a"), make_sample("QueryAttr", qid="b")], progress=False)
    assert list(table.question_id.unique()) == ["a", "b"] and set(table.lens) == {"normed"}
