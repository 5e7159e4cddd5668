"""The model layer: family adapters, the paper's prompts, saving and loading every family, and bad input."""

import pickle
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPVisionConfig, LlamaConfig

from flowlib import config as cfg
from flowlib.models import (
    PromptStyle,
    UnsupportedModelError,
    adapter_for,
    build_prompt,
    load_model,
    save_checkpoint,
)
from flowlib.run_folder import load_statuses
from flowlib.sample import SampleError
from flowlib.tiny import tiny_llava

from .conftest import logits, make_sample, tiny_model

VICUNA = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. USER: <image>\nIs the jar full or empty? \n"
    "Answer the question using a single word or phrase. ASSISTANT:"
)


def test_vicuna_prompt_is_the_papers():
    prompt, start = build_prompt("Is the jar full or empty?", PromptStyle.VICUNA)
    assert prompt == VICUNA
    assert prompt[start : start + len("Is the jar full or empty?")] == "Is the jar full or empty?"


def test_llama3_prompt_is_the_template_with_its_system_message_plus_space_newline():
    prompt, start = build_prompt("Is the jar full or empty?", PromptStyle.LLAMA3)
    assert prompt == (
        "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful language and vision assistant. You are "
        "able to understand the visual content that the user provides, and assist the user with a variety of tasks "
        "using natural language.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n<image>\nIs the jar full or empty? \n"
        "Answer the question using a single word or phrase.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n \n"
    )
    assert prompt[start:].startswith("Is the jar")


def test_adapter_is_chosen_by_config_class(tiny15, tiny_next):
    assert tiny15.adapter.name == "llava-1.5" and tiny_next.adapter.name == "llava-next"
    with pytest.raises(UnsupportedModelError, match="llava-1.5 .*llava-next"):
        adapter_for(LlamaConfig())
    with pytest.raises(UnsupportedModelError):
        adapter_for(CLIPVisionConfig())


@pytest.mark.parametrize("fixture", ["tiny15", "tiny_next"])
def test_question_positions_decode_to_the_question(fixture, request, sample):
    loaded = request.getfixturevalue(fixture)
    prepared = loaded.prepare(sample)
    ids = prepared.input_ids[0]
    layout = prepared.layout
    assert loaded.tokenizer.decode(ids[layout.question]) == "is the star red or blue ?"
    assert loaded.tokenizer.decode(ids[layout.true_option]) == "red"
    assert loaded.tokenizer.decode(ids[layout.false_option]) == "blue"
    assert loaded.tokenizer.decode(ids[layout.central_object]) == "star"
    assert loaded.tokenizer.decode(ids[layout.question_without_options]) == "is the star or ?"
    assert layout.last.tolist() == [len(ids) - 1]
    assert loaded.tokenizer.decode(ids[-2:]) == "ASSISTANT :"
    assert (ids[layout.image] == loaded.model.config.image_token_id).all()


@pytest.mark.parametrize("fixture", ["tiny15", "tiny_next"])
def test_groups_are_disjoint_where_they_must_be(fixture, request, sample):
    layout = request.getfixturevalue(fixture).prepare(sample).layout
    image = set(layout.image.tolist())
    related, other = set(layout.related_image_patches.tolist()), set(layout.other_image_patches.tolist())
    newlines = set(layout.image_newlines.tolist())
    assert related and other and not related & other
    assert related | other | newlines == image
    assert not newlines & (related | other)
    assert not image & set(layout.question.tolist())
    assert not set(layout.last.tolist()) & (image | set(layout.question.tolist()))
    assert max(layout.image) < min(layout.question)
    if layout.base_view.size:
        assert set(layout.base_view.tolist()) | set(layout.high_resolution.tolist()) | newlines == image
        # A box is related in both the base view and the high-resolution tiles.
        assert related & set(layout.base_view.tolist()) and related & set(layout.high_resolution.tolist())


def test_group_lookup_lists_valid_names(tiny15, sample):
    layout = tiny15.prepare(sample).layout
    with pytest.raises(KeyError, match="valid groups: Image, Question"):
        layout.group("Picture")


def test_pad_is_default_and_crop_is_a_parameter(tmp_path):
    loaded = tiny_llava("llava-1.5")
    # Simulate a llava-hf checkpoint, whose processor centre-crops.
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    loaded.processor.image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": 112}, crop_size={"height": 112, "width": 112}
    )
    path = save_checkpoint(loaded, tmp_path / "ckpt")
    padded = load_model(str(path))
    cropped = load_model(str(path), image_mode="crop")
    assert padded.processor.image_processor.do_pad and not cropped.processor.image_processor.do_pad
    image = Image.new("RGB", (200, 100), (255, 0, 0))
    pixels = padded.processor.image_processor(image, return_tensors="pt")["pixel_values"][0]
    # Rows above the picture hold the normalised mean colour (about 0 after normalisation), not red.
    assert pixels[:, 0, :].abs().max() < 0.02
    assert cropped.processor.image_processor(image, return_tensors="pt")["pixel_values"][0][0].min() > 1.5
    with pytest.raises(ValueError, match="image_mode"):
        load_model(str(path), image_mode="anyres")


#: The families whose checkpoints carry a processor of their own (LLaVA-1.5's is the run tests' checkpoint),
#: and the prompt style each must come back with.
SAVED_STYLES = {"llava-next": "vicuna", "qwen2.5-vl": "chatml", "llava-onevision": "chatml"}


@pytest.fixture(scope="module", params=SAVED_STYLES)
def saved(request, tmp_path_factory):
    """(family, the tiny model, its checkpoint folder)."""
    loaded = tiny_model(request.param, layers=3)
    return request.param, loaded, save_checkpoint(loaded, tmp_path_factory.mktemp(request.param) / "model")


def test_a_saved_checkpoint_reloads_with_its_adapter_and_the_same_numbers(saved, sample):
    family, loaded, folder = saved
    disk = load_model(str(folder), dtype="float32", device="cpu")
    assert disk.adapter.name == family and disk.prompt_style.value == SAVED_STYLES[family]
    assert disk.provenance()["num_layers"] == loaded.num_layers
    assert isinstance(disk.processor, disk.adapter.processor_class)
    assert type(pickle.loads(pickle.dumps(disk.processor))) is type(disk.processor)  # worker processes get a copy
    for s in (sample, make_sample(200, 150)):
        a, b = loaded.prepare(s), disk.prepare(s)
        assert torch.equal(a.input_ids, b.input_ids) and np.array_equal(a.layout.image, b.layout.image)
        assert torch.equal(logits(loaded, a), logits(disk, b))


@pytest.mark.parametrize("saved", ["qwen2.5-vl", "llava-onevision"], indirect=True)  # LLaVA: test_runner's
def test_flowlib_run_accepts_a_saved_checkpoint_folder(saved, tmp_path):
    from flowlib import cli
    from flowlib.run_folder import read_run
    from tests.test_cli_errors import run_args
    from tests.test_run_contract import make_paper_data

    _, _, folder = saved
    disk = load_model(str(folder))
    csv_dir, image_dir = make_paper_data(tmp_path, disk, colours=("red", "blue"), wrong=())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main(run_args(folder, csv_dir, image_dir, tmp_path / "out")) == 0
    assert read_run(tmp_path / "out") is not None
    assert [s["status"] for s in load_statuses(tmp_path / "out")] == ["analysed", "analysed"]


def test_missing_short_name_checkpoint_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setitem(cfg.SHORT_NAMES, "nowhere", tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="train it"):
        load_model("nowhere")


def test_groups_that_cannot_be_located_are_empty_with_their_reason(tiny15):
    layout = tiny15.prepare(make_sample(true_option="green")).layout
    assert len(layout.true_option) == 0 and len(layout.false_option) == 1
    assert layout.why_empty("True Option") == "true option 'green' is not in the question, in any form"
    assert layout.why_empty("False Option") == ""
    for box in [(10, 10, 0, 5), (400, 10, 20, 20)]:  # no area; wholly outside the 320x240 image
        with pytest.warns(UserWarning, match="no area"):
            layout = tiny15.prepare(make_sample(boxes=[box])).layout
        assert len(layout.related_image_patches) == 0 and len(layout.other_image_patches) == 64  # 8 x 8 patches
        assert layout.why_empty("Related Image Patches") == "its boxes lie outside the 320x240 image"
    with pytest.warns(UserWarning, match="covers no image patch"):  # no pixel centre inside it
        layout = tiny15.prepare(make_sample(boxes=[(1.1, 1.1, 0.2, 0.2)])).layout
    assert layout.why_empty("Related Image Patches") == "no box of the question's objects covers an image patch"
    layout = tiny15.prepare(make_sample(240, 240, boxes=[(0, 0, 240, 240)])).layout
    assert layout.why_empty("Other Image Patches") == "the related patches cover the whole image"
    layout = tiny15.prepare(make_sample(boxes=[])).layout
    assert layout.why_empty("Related Image Patches").startswith("the sample has no box")


@pytest.mark.parametrize(
    "question, word, last, found, how",
    [
        ("Is the jar full or empty?", "empty", True, "empty", "word"),
        ("Are there refrigerators or ovens?", "refrigerator", False, "refrigerators", "inflection"),
        ("Do you see men or women?", "woman", False, "women", "inflection"),
        ("Is there a bus?", "buses", False, "bus", "inflection"),
        ("Is the racket to the left or to the right of him?", "he", False, "him", "inflection"),
        ("Is the man wearing a necktie?", "tie", False, "necktie", "part of word"),
        ("Is the red car left or right of the car?", "car", True, "car", "word"),
    ],
)
def test_words_are_located_as_the_official_substring_search_would_with_inflections(question, word, last, found, how):
    from flowlib.layout import locate_word

    (start, end), got = locate_word(question, word, last)
    assert (question[start:end], got) == (found, how)
    assert start == (question.rindex(found) if last else question.index(found))


def test_short_words_never_match_inside_other_words():
    from flowlib.layout import locate_word

    assert locate_word("Who holds the umbrella?", "he") == (None, "'he' is not in the question, in any form")


def test_bad_inputs_get_clear_errors(tiny15, tmp_path):
    with pytest.warns(UserWarning, match="clipped"):
        layout = tiny15.prepare(make_sample(boxes=[(300, 200, 100, 100)])).layout
    assert len(layout.related_image_patches) > 0
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    with pytest.raises(SampleError, match="cannot be read"):
        tiny15.prepare(make_sample(image=str(broken)))
    with pytest.raises(SampleError, match="does not exist"):
        tiny15.prepare(make_sample(image=str(tmp_path / "absent.jpg")))


def test_prompt_without_image_placeholder_is_an_error(tiny15, sample):
    from flowlib.layout import build_layout

    ids = tiny15.tokenizer("is the star red or blue ?", return_tensors="pt")["input_ids"][0]
    geometry = tiny15.adapter.geometry(tiny15.processor, 320, 240)
    with pytest.raises(SampleError, match="no <image> placeholder"):
        build_layout(
            sample=sample,
            input_ids=ids,
            tokenizer=tiny15.tokenizer,
            prompt="is the star red or blue ?",
            question_start=0,
            geometry=geometry,
            image_size=(320, 240),
        )


@pytest.mark.parametrize("family", ["llava-1.5", "llava-next"])
def test_generation_stops_at_the_tokenizers_end_of_sequence(family):
    loaded = tiny_llava(family)
    tokenizer = loaded.tokenizer
    config = loaded.model.generation_config
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    assert tokenizer.convert_ids_to_tokens(config.eos_token_id) == "</s>"
