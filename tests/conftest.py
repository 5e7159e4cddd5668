"""Shared fixtures: tiny models of each family and a simple sample. Tests never download."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from flowlib import models  # noqa: E402
from flowlib.sample import Box, Sample  # noqa: E402
from flowlib.tiny import tiny_llava  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SHARED_DIR = Path(__file__).resolve().parents[2] / "shared"

LLAVA_FAMILIES = ("llava-1.5", "llava-next")
#: Every family's tiny model at a small image size, so that a knockout or sweep test takes a second or two:
#: flowlib.tiny's LLaVA views are 112 pixels already; Qwen gets 64 merged tokens at most; OneVision 60-pixel
#: views (4 x 4 patches of 14 pixels, the last 4 pixels unread, as the released 384-pixel views leave 6).
SMALL_IMAGES = {
    "llava-1.5": {},
    "llava-next": {},
    "qwen2.5-vl": {"max_pixels": 28 * 28 * 64},
    "qwen2-vl": {"max_pixels": 28 * 28 * 64},
    "llava-onevision": {"image_size": 60},
}
ALL_FAMILIES = tuple(SMALL_IMAGES)


def tiny_model(family, **overrides):
    """A tiny random model of any family at its small image size (4 layers unless `layers` is given)."""
    from flowlib.families.tiny import tiny_family

    build = tiny_llava if family in LLAVA_FAMILIES else tiny_family
    return build(family, **{**SMALL_IMAGES[family], **overrides})


def logits(loaded, prepared, **kwargs):
    """The model's logits on one prepared sample (no gradients)."""
    with torch.no_grad():
        return loaded.model(**prepared.inputs, **kwargs).logits


@pytest.fixture(scope="session")
def shared_dir():
    """../shared beside the checkout; tests that need it skip cleanly when it is absent."""
    if not SHARED_DIR.is_dir():
        pytest.skip("../shared is not present beside the checkout")
    return SHARED_DIR


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: on 2 shared cores, OpenMP oversubscription otherwise slows these tests 5x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny15():
    return tiny_llava("llava-1.5")


@pytest.fixture(scope="session")
def tiny_next():
    return tiny_llava("llava-next")


@pytest.fixture(scope="session")
def next_checkpoint(tmp_path_factory):
    """A LLaVA-NeXT checkpoint folder that answers: the offline model's weights under anyres."""
    from flowlib.models import load_model, save_checkpoint
    from flowlib.tiny import llava_next_from_llava

    return str(save_checkpoint(llava_next_from_llava(load_model("toy-llava")), tmp_path_factory.mktemp("toy-next")))


def make_sample(width=320, height=240, boxes=((10, 20, 50, 60),), seed=0, **overrides):
    """A ChooseAttr-style sample on a random-noise image."""
    import numpy as np

    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))
    fields = dict(
        question_id="q1",
        question="is the star red or blue?",
        answer="red",
        task="ChooseAttr",
        image=image,
        true_option="red",
        false_option="blue",
        central_object="star",
        boxes=[b if isinstance(b, Box) else Box(*b) for b in boxes],
    )
    fields.update(overrides)
    return Sample(**fields)


def white_sample(boxes=None, qid="q1"):
    """A small all-white ChooseAttr sample (the knockout and sweep tests' input)."""
    boxes = (Box(10, 20, 50, 60),) if boxes is None else boxes
    return make_sample(160, 120, boxes, question_id=qid, image=Image.new("RGB", (160, 120), "white"))


@pytest.fixture
def sample():
    return make_sample()


@pytest.fixture(scope="module", params=ALL_FAMILIES)
def any_tiny(request):
    """A 4-layer `tiny_model` of every family; shared by a module, so a test that changes it restores it."""
    return tiny_model(request.param)


@pytest.fixture(scope="module", params=LLAVA_FAMILIES)
def white_llava(request):
    """(loaded, prepared): the 4-layer tiny LLaVA of each family on `white_sample` (knockout, lens, score tests)."""
    loaded = tiny_llava(request.param)
    return loaded, loaded.prepare(white_sample())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny LLaVA-1.5 (3 layers) saved as a checkpoint folder (the run-folder and CLI tests)."""
    return models.save_checkpoint(tiny_llava("llava-1.5", layers=3), tmp_path_factory.mktemp("ckpt") / "model")


@pytest.fixture(scope="module")
def disk_model(checkpoint):
    return models.load_model(str(checkpoint))


@pytest.fixture(scope="module", params=LLAVA_FAMILIES)
def white_tiny(request):
    """(loaded, prepared, clean pass): a 5-layer tiny model of each family on `white_sample` (the sweep tests)."""
    from flowlib.sweep import clean_pass

    loaded = tiny_llava(request.param, layers=5)
    prepared = loaded.prepare(white_sample())
    return loaded, prepared, clean_pass(loaded, prepared)
