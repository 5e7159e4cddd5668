"""Every one of the 5,525 released questions through the paper models' input path: no crash, every exclusion named.

Models built from the real architectures' configs (tiny width, 2 layers, random weights: `prepare`
needs the configs, processor and tokenizer, not trained weights), the real tokenizers from
../shared/tokenizers, the released CSVs from ../shared/gqa, and stand-in images of each row's stated
size (GQA's images are not here). For each question and each of the paper's six flows, the flow's
groups either exist and cut at least one edge, or the sample is left out of that flow with a reason.
The counts per reason are written to build/reports/ and printed.
"""

import collections
import json
import warnings

import pytest
from PIL import Image

from flowlib.architectures import PAPER_CHECKPOINTS, build_model, build_processor
from flowlib.config import PROJECT_DIR
from flowlib.data.gqa_tasks import load_paper_tasks
from flowlib.flows import PAPER_FLOWS, FlowError, check_flows
from flowlib.layout import GROUPS
from flowlib.models import wrap_model
from tests.real_tokenizers import tokenizer_for

pytestmark = [pytest.mark.shared, pytest.mark.slow]

#: Both families and both prompt styles: LLaVA-1.5 with Vicuna (13b and v1.6-vicuna share its prompt and
#: tokenizer) and LLaVA-NeXT with Llama-3 (v1.6-vicuna shares its anyres geometry).
PATHS = ["llava-hf/llava-1.5-7b-hf", "llava-hf/llama3-llava-next-8b-hf"]
REPORTS = PROJECT_DIR / "build" / "reports"


@pytest.fixture(scope="module")
def released(shared_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ~100 released boxes overhang their images; each is clipped
        samples = load_paper_tasks(shared_dir / "gqa")
    images = {}
    for sample in samples:  # one uniform stand-in per stated size, shared by the samples of that size
        size = sample.image_size
        sample.image = images.setdefault(size, Image.new("RGB", size, (120, 110, 100)))
    return samples


class SizeMemo:
    """The image processor, remembering its output per image size: the stand-ins of one size are one image.

    Every other step of `prepare` (prompt, token expansion from the image size, tokenizer, layout, box
    mapping) runs for every question; only re-normalising identical pixels is skipped (~461 sizes).
    """

    def __init__(self, image_processor):
        self.__dict__["_inner"], self.__dict__["_seen"] = image_processor, {}

    def __call__(self, images, **kwargs):
        key = (images.size, tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
        if key not in self._seen:
            self._seen[key] = self._inner(images, **kwargs)
        return self._seen[key]

    def __getattr__(self, name):
        return getattr(self._inner, name)


@pytest.mark.parametrize("name", PATHS)
def test_every_released_question_prepares_and_every_exclusion_has_a_reason(name, released, shared_dir):
    arch = PAPER_CHECKPOINTS[name]
    tokenizer = tokenizer_for(arch.tokenizer, shared_dir)
    loaded = wrap_model(build_model(name, num_layers=2), build_processor(name, tokenizer), name=name)
    assert loaded.prompt_style.value == arch.prompt_style
    loaded.processor.image_processor = SizeMemo(loaded.processor.image_processor)

    reasons, empty_groups, counted = collections.Counter(), collections.Counter(), 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # boxes beyond their image warn; their reasons are checked below
        for sample in released:
            layout = loaded.prepare(sample).layout  # must never raise
            counted += 1
            for group in GROUPS:
                if len(layout.group(group)) == 0 and layout.why_empty(group):
                    empty_groups[f"{group}: {layout.why_empty(group)}"] += 1
            for flow in PAPER_FLOWS:
                try:
                    check_flows(layout, [flow])
                except FlowError as err:
                    reason = str(err).split(": ", 1)[1]
                    assert "(" in reason, f"{sample.question_id}: exclusion without a reason: {err}"
                    reasons[f"{flow}: {reason.split('(', 1)[1].split(')')[0]}"] += 1

    REPORTS.mkdir(parents=True, exist_ok=True)
    report = {
        "model": name,
        "questions": counted,
        "flow_exclusions": dict(reasons.most_common()),
        "empty_groups": dict(empty_groups.most_common()),
    }
    (REPORTS / f"released_questions_{name.split('/')[-1]}.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))

    assert counted == 5525
    # Only the patch flows can lose a sample, and only for want of patches: the released row whose
    # box lies beyond its image, and boxes that cover every patch.
    assert {key.split(":")[0] for key in reasons} <= {
        "Related Image Patches->Question",
        "Other Image Patches->Question",
    }
    assert reasons["Related Image Patches->Question: its boxes lie outside the 500x375 image"] == 1
    # Every option and object name is found in its question, in some form.
    assert not [key for key in empty_groups if key.startswith(("True Option", "False Option", "Central Object"))]
