"""The paper's prompts through the real Llama-2 and Llama-3 tokenizers, and the token layout they give.

The ids below are written out by hand from the upstream vocabularies, so a change of prompt,
tokenizer setting (the `'▁'` after `<image>`, see tests/real_tokenizers.py) or processor shows
up here as a failing literal, not as a silently shifted token group.
"""

import hashlib
import inspect

import pytest
import torch
from transformers import AutoTokenizer
from transformers.convert_slow_tokenizer import TikTokenConverter

from flowlib.architectures import PAPER_CHECKPOINTS, build_model, build_processor
from flowlib.models import PromptStyle, build_prompt, wrap_model

from .conftest import make_sample
from .real_tokenizers import LLAMA3_PATTERN, SHA256, llama3_tokenizer, tokenizer_for, vicuna_tokenizer

pytestmark = pytest.mark.shared
#: Building the 128k-token Llama-3 tokenizer takes a few seconds (once per process).
SLOW_LLAMA3 = pytest.mark.slow

QUESTION = "Is the car red or blue?"

# The Vicuna prompt from "USER:" to the end: the space after "USER:" is a '▁' before the image, and
# llava-hf's legacy tokenizer puts another '▁' after it, before the newline.
VICUNA_TAIL = [
    ("▁US", 3148),
    ("ER", 1001),
    (":", 29901),
    ("▁", 29871),
    ("<image>", 32000),
    ("▁", 29871),
    ("<0x0A>", 13),
    ("Is", 3624),
    ("▁the", 278),
    ("▁car", 1559),
    ("▁red", 2654),
    ("▁or", 470),
    ("▁blue", 7254),
    ("?", 29973),
    ("▁", 29871),
    ("<0x0A>", 13),
    ("Answer", 22550),
    ("▁the", 278),
    ("▁question", 1139),
    ("▁using", 773),
    ("▁a", 263),
    ("▁single", 2323),
    ("▁word", 1734),
    ("▁or", 470),
    ("▁phrase", 16549),
    (".", 29889),
    ("▁A", 319),
    ("SS", 1799),
    ("IST", 9047),
    ("ANT", 13566),
    (":", 29901),
]
VICUNA_HEAD = [("<s>", 1), ("▁A", 319), ("▁chat", 13563), ("▁between", 1546)]

LLAMA3_HEAD = [
    ("<|begin_of_text|>", 128000),
    ("<|start_header_id|>", 128006),
    ("system", 9125),
    ("<|end_header_id|>", 128007),
    ("ĊĊ", 271),
    ("You", 2675),
    ("Ġare", 527),
    ("Ġa", 264),
    ("Ġhelpful", 11190),
]
# From the end of the system message to the end: "\n\n" is one token, so is the appended " \n".
LLAMA3_TAIL = [
    ("Ġlanguage", 4221),
    (".", 13),
    ("<|eot_id|>", 128009),
    ("<|start_header_id|>", 128006),
    ("user", 882),
    ("<|end_header_id|>", 128007),
    ("ĊĊ", 271),
    ("<image>", 128256),
    ("Ċ", 198),
    ("Is", 3957),
    ("Ġthe", 279),
    ("Ġcar", 1841),
    ("Ġred", 2579),
    ("Ġor", 477),
    ("Ġblue", 6437),
    ("?", 30),
    ("ĠĊ", 720),
    ("Answer", 16533),
    ("Ġthe", 279),
    ("Ġquestion", 3488),
    ("Ġusing", 1701),
    ("Ġa", 264),
    ("Ġsingle", 3254),
    ("Ġword", 3492),
    ("Ġor", 477),
    ("Ġphrase", 17571),
    (".", 13),
    ("<|eot_id|>", 128009),
    ("<|start_header_id|>", 128006),
    ("assistant", 78191),
    ("<|end_header_id|>", 128007),
    ("ĊĊ", 271),
    ("ĠĊ", 720),
]


@pytest.fixture(scope="module")
def shared(shared_dir):
    if not (shared_dir / "tokenizers").is_dir():
        pytest.skip("../shared/tokenizers is not present beside the checkout")
    return shared_dir


def _pairs(tokenizer, ids):
    return list(zip(tokenizer.convert_ids_to_tokens(ids), ids))


def test_shared_files_are_the_upstream_files(shared):
    # Checked first: every id below assumes these exact vocabularies.
    for relative, expected in SHA256.items():
        assert hashlib.sha256((shared / "tokenizers" / relative).read_bytes()).hexdigest() == expected, relative


def test_vicuna_prompt_ids(shared):
    tokenizer = vicuna_tokenizer(shared)
    ids = tokenizer(build_prompt(QUESTION, PromptStyle.VICUNA)[0])["input_ids"]
    pairs = _pairs(tokenizer, ids)
    assert len(ids) == 62
    assert pairs[:4] == VICUNA_HEAD
    assert pairs[-len(VICUNA_TAIL) :] == VICUNA_TAIL
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 32001)


@SLOW_LLAMA3
def test_llama3_prompt_ids(shared):
    tokenizer = llama3_tokenizer(shared)
    ids = tokenizer(build_prompt(QUESTION, PromptStyle.LLAMA3)[0])["input_ids"]
    pairs = _pairs(tokenizer, ids)
    assert len(ids) == 71
    assert pairs[: len(LLAMA3_HEAD)] == LLAMA3_HEAD
    assert pairs[-len(LLAMA3_TAIL) :] == LLAMA3_TAIL
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (128000, 128009, 128257)
    assert len(tokenizer) == 128258


def test_llama3_pattern_is_the_one_transformers_converts_llama3_with():
    assert inspect.signature(TikTokenConverter).parameters["pattern"].default == LLAMA3_PATTERN


@pytest.mark.parametrize("kind", ["llama-2", pytest.param("llama-3", marks=SLOW_LLAMA3)])
def test_tokenizers_save_and_reload_with_identical_ids(kind, shared, tmp_path):
    tokenizer = tokenizer_for(kind, shared)
    style = PromptStyle.VICUNA if kind == "llama-2" else PromptStyle.LLAMA3
    prompt = build_prompt(QUESTION, style)[0].replace("<image>", "<image>" * 3)
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(prompt)["input_ids"] == tokenizer(prompt)["input_ids"]
    assert reloaded.convert_tokens_to_ids("<image>") == tokenizer.convert_tokens_to_ids("<image>")
    assert (reloaded.eos_token_id, reloaded.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)


def test_each_call_gets_its_own_copy(shared):
    first, second = vicuna_tokenizer(shared), vicuna_tokenizer(shared)
    first.add_tokens(["<only-in-first>"])
    assert "<only-in-first>" not in second.get_vocab()


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=SLOW_LLAMA3 if arch.tokenizer == "llama-3" else ())
        for name, arch in PAPER_CHECKPOINTS.items()
    ],
)
def test_layout_of_the_real_prompt(name, shared):
    arch = PAPER_CHECKPOINTS[name]
    tokenizer = tokenizer_for(arch.tokenizer, shared)
    loaded = wrap_model(build_model(name), build_processor(name, tokenizer), name=name)
    assert loaded.prompt_style.value == arch.prompt_style
    sample = make_sample(500, 375, question=QUESTION, answer="red", central_object="car")
    prepared = loaded.prepare(sample)
    ids = prepared.input_ids[0].tolist()
    layout = prepared.layout

    question = layout.group("Question")
    assert list(question) == list(range(question[0], question[-1] + 1))
    assert tokenizer.decode([ids[i] for i in question]) == QUESTION
    assert list(layout.group("Last")) == [len(ids) - 1]
    if arch.prompt_style == "vicuna":
        assert tokenizer.convert_ids_to_tokens(ids[-5:]) == ["▁A", "SS", "IST", "ANT", ":"]
        assert loaded.stop_token_ids == [2]
    else:
        assert tokenizer.convert_ids_to_tokens(ids[-3:]) == ["<|end_header_id|>", "ĊĊ", "ĠĊ"]
        assert loaded.stop_token_ids == [128009, 128001]  # <|eot_id|> and <|end_of_text|>

    image = layout.group("Image")
    assert len(image) == (576 if arch.family == "llava-1.5" else 2340)  # 500x375: 36 rows of 48 + newline
    assert all(ids[i] == arch.image_token_id for i in image)
    assert ids[image[0] - 1] == tokenizer.convert_tokens_to_ids("▁" if arch.tokenizer == "llama-2" else "ĊĊ")
    with torch.no_grad():  # the real layout runs through the model; only the last position's logits
        logits = loaded.model(**prepared.inputs, logits_to_keep=1).logits
    assert logits.shape == (1, 1, arch.text["vocab_size"]) and torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "size, tokens", [((640, 480), 2340), ((480, 640), 2352), ((500, 333), 1464), ((500, 500), 2928)]
)
def test_llava_next_image_token_counts(size, tokens, shared):
    name = "llava-hf/llava-v1.6-vicuna-7b-hf"
    loaded = wrap_model(build_model(name), build_processor(name, vicuna_tokenizer(shared)), name=name)
    layout = loaded.prepare(make_sample(*size)).layout
    rows = len(layout.group("Image Newlines"))
    cols = len(layout.group("High Resolution")) // rows
    assert len(layout.group("Base View")) == 576
    assert len(layout.group("Image")) == 576 + rows * (cols + 1) == tokens


def test_vicuna_answer_decodes_without_its_stop_token(shared):
    vicuna = vicuna_tokenizer(shared)
    yes = vicuna("Yes", add_special_tokens=False)["input_ids"]
    assert vicuna.convert_ids_to_tokens(yes) == ["▁Yes"]
    assert vicuna.decode(yes + [vicuna.eos_token_id], skip_special_tokens=True) == "Yes"


@SLOW_LLAMA3
def test_llama3_answer_decodes_without_its_end_of_turn(shared):
    llama3 = llama3_tokenizer(shared)
    yes = llama3("Yes", add_special_tokens=False)["input_ids"]
    assert yes == [9642]
    assert llama3.decode(yes + [llama3.convert_tokens_to_ids("<|eot_id|>")], skip_special_tokens=True) == "Yes"
