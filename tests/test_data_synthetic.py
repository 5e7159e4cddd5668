"""Tests of the synthetic world: answers follow from the scene graph, boxes hug the drawn
objects, generation is deterministic and balanced, and text alone gives chance accuracy."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict

import numpy as np
import pytest

from flowlib import config
from flowlib.data import drawing, scenes
from flowlib.data import synthetic as syn
from flowlib.sample import TASKS


@pytest.fixture(scope="module")
def world():
    # Two splits large enough for the text-only baseline to be measured to a few points.
    return syn.generate_world(360, seed=7, splits={"train": 0.5, "test": 0.5})


@pytest.fixture(scope="module")
def rows(world):
    return world["train"].remove_columns("image").to_list()


def _by_name(scene):
    objects = list(scene["objects"].values())
    names = [o["name"] for o in objects]
    assert len(names) == len(set(names)), "shape names must be unique referring expressions"
    return {o["name"]: o for o in objects}


def _solve(question: str, scene: dict) -> str:
    """Recompute the answer from the scene graph alone, parsing the question independently."""
    objs = _by_name(scene)
    if m := re.fullmatch(r"is the (\w+) (\w+) or (\w+)\?", question):
        obj = objs[m[1]]
        hits = [v for v in (m[2], m[3]) if v in obj["attributes"]]
        assert len(hits) == 1
        return hits[0]
    if m := re.fullmatch(r"which shape is the (\w+) object, a (\w+) or a (\w+)\?", question):
        matches = [o for o in objs.values() if o["color"] == m[1]]
        assert len(matches) == 1, "the referred object must be unique"
        assert matches[0]["name"] in (m[2], m[3])
        return matches[0]["name"]
    if m := re.fullmatch(r"is the (\w+) (?:to the )?(\w+) or (?:to the )?(\w+) (?:of )?the (\w+)\?", question):
        a, b = objs[m[1]], objs[m[4]]
        truth = {
            "left": a["x"] + a["w"] <= b["x"],
            "right": b["x"] + b["w"] <= a["x"],
            "above": a["y"] + a["h"] <= b["y"],
            "below": b["y"] + b["h"] <= a["y"],
        }
        hits = [v for v in (m[2], m[3]) if truth[v]]
        assert len(hits) == 1
        return hits[0]
    if m := re.fullmatch(r"what do the (\w+) and the (\w+) have in common\?", question):
        a, b = objs[m[1]], objs[m[2]]
        shared = [k for k in ("color", "size", "texture") if a[k] == b[k]]
        assert len(shared) == 1
        return shared[0]
    if m := re.fullmatch(r"is there either a (\w+) or a (\w+) that is (\w+)\?", question):
        return "yes" if any(n in objs and m[3] in objs[n]["attributes"] for n in (m[1], m[2])) else "no"
    if m := re.fullmatch(r"on which side of the image is the (\w+)\?", question):
        o, mid = objs[m[1]], scene["width"] / 2
        assert o["x"] + o["w"] <= mid or o["x"] >= mid
        return "left" if o["x"] + o["w"] <= mid else "right"
    raise AssertionError(f"unparsed question {question!r}")


def test_answers_follow_from_scene_graph(rows):
    for row in rows:
        assert _solve(row["question"], json.loads(row["scene_graph"])) == row["answer"], row["question"]


def test_boxes_are_the_question_objects(rows):
    for row in rows:
        scene = json.loads(row["scene_graph"])
        objs = _by_name(scene)
        for box in row["boxes"]:
            o = objs[box["label"]]
            assert (box["x"], box["y"], box["w"], box["h"]) == (o["x"], o["y"], o["w"], o["h"])
            assert box["label"] in row["question"]
        expected = {"ChooseAttr": 1, "ChooseCat": 1, "ChooseRel": 2, "CompareAttr": 2, "QueryAttr": 1}
        if row["task"] == "ChooseRel":  # GQA's order: the reference object (object1), then the subject
            words = row["question"].rstrip("?").split()
            assert [b["label"] for b in row["boxes"]] == [words[-1], words[2]] == [row["central_object"], words[2]]
        if row["task"] in expected:
            assert len(row["boxes"]) == expected[row["task"]]
        else:  # LogicalObj: boxes of the named objects that are present
            named = re.findall(r"a (\w+)", row["question"])
            assert [b["label"] for b in row["boxes"]] == [n for n in named if n in objs]


def test_boxes_cover_drawn_pixels_and_survive_downscaling(world):
    subset = world["train"].select(range(0, len(world["train"]), 7))
    for row in subset:
        scene = json.loads(row["scene_graph"])
        pixels = np.asarray(row["image"].convert("RGB")).astype(int)
        assert pixels.shape == (row["image_h"], row["image_w"], 3)
        drawn = (pixels != np.array(scene["background"])).any(-1)
        for o in scene["objects"].values():
            x, y, w, h = o["x"], o["y"], o["w"], o["h"]
            assert 0 <= x and 0 <= y and x + w <= row["image_w"] and y + h <= row["image_h"]
            assert min(w, h) * config.TOY_IMAGE_SIZE / max(row["image_w"], row["image_h"]) >= 20
            # Every drawn pixel near the object lies in its box, and the box is tight on all four sides.
            x0, y0 = max(0, x - 4), max(0, y - 4)
            region = drawn[y0 : y + h + 4, x0 : x + w + 4].copy()
            inside = drawn[y : y + h, x : x + w]
            assert region.sum() == inside.sum()
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            own = (pixels[y : y + h, x : x + w] == np.array(drawing.COLORS[o["color"]])).all(-1)
            assert own.sum() > 0.1 * w * h  # stars fill ~40% of their box, stripes half of that
    # Shapes stay readable (over 20 processed px) and every object spans more than one patch.
    assert scenes.SMALLEST_OBJECT_PROCESSED_PX >= 20 and scenes.SMALLEST_OBJECT_PROCESSED_PX > config.TOY_PATCH_SIZE


def test_balance_and_coverage(rows):
    by_task = defaultdict(list)
    for row in rows:
        by_task[row["task"]].append(row)
    assert set(by_task) == set(TASKS) and all(len(v) == 180 for v in by_task.values())
    answers = {t: Counter(r["answer"] for r in v) for t, v in by_task.items()}
    assert set(answers["CompareAttr"]) == {"color", "size", "texture"}
    assert set(answers["LogicalObj"]) == {"yes", "no"} and set(answers["QueryAttr"]) == {"left", "right"}
    assert set(answers["ChooseRel"]) == {"left", "right", "above", "below"}
    assert set(answers["ChooseCat"]) == set(drawing.SHAPES)
    assert set(answers["ChooseAttr"]) == {v for vs in scenes.ATTRIBUTES.values() for v in vs}
    for task in ("CompareAttr", "LogicalObj", "QueryAttr"):
        assert max(answers[task].values()) - min(answers[task].values()) <= 1
    for task in ("ChooseAttr", "ChooseCat", "ChooseRel"):
        firsts = [r["question"].index(r["true_option"]) < r["question"].index(r["false_option"]) for r in by_task[task]]
        assert sum(firsts) == len(firsts) // 2
    img_sizes = Counter((r["image_w"], r["image_h"]) for r in rows)
    assert set(img_sizes) == {(320, 240), (240, 320)}


def test_text_only_baseline_is_at_chance(world):
    train, test = (world[s].remove_columns("image").to_list() for s in ("train", "test"))
    answer_sets = defaultdict(set)
    for r in train:
        answer_sets[r["task"]].add(r["answer"])

    def candidates(r):
        # Options in question order: listing the true option first would leak it through tie-breaking.
        if r["true_option"]:
            return sorted([r["true_option"], r["false_option"]], key=lambda a: r["question"].index(a))
        return sorted(answer_sets[r["task"]])

    def slot(r, a):  # an option's position in the question, else the answer word itself
        return r["question"].index(a) if r["true_option"] else a

    by_question, by_pattern = defaultdict(Counter), defaultdict(Counter)
    for r in train:
        by_question[r["question"]][r["answer"]] += 1
        by_pattern[r["pattern"]][
            r["true_option"] and (r["question"].index(r["true_option"]) < r["question"].index(r["false_option"]))
        ] += 1
        by_pattern[r["pattern"], "answer"][r["answer"]] += 1
    correct_q = correct_p = chance = 0.0
    for r in test:
        cands = candidates(r)
        chance += 1 / len(cands)
        seen = by_question.get(r["question"])
        guess_q = max(cands, key=lambda a: (seen or Counter())[a] * 10 + by_pattern[r["pattern"], "answer"][a])
        if r["true_option"]:  # the pattern's favourite option position
            first_wins = by_pattern[r["pattern"]][True] >= by_pattern[r["pattern"]][False]
            guess_p = min(cands, key=lambda a: slot(r, a)) if first_wins else max(cands, key=lambda a: slot(r, a))
        else:
            guess_p = max(cands, key=lambda a: by_pattern[r["pattern"], "answer"][a])
        correct_q += guess_q == r["answer"]
        correct_p += guess_p == r["answer"]
    n = len(test)
    print("text-only baselines", correct_q / n, correct_p / n, "chance", chance / n)
    assert abs(correct_q / n - chance / n) < 0.05, (correct_q / n, chance / n)
    assert abs(correct_p / n - chance / n) < 0.05, (correct_p / n, chance / n)


def test_distractor_cap_keeps_only_the_named_objects_and_true_answers():
    capped = syn.generate_split(12, seed=3, split="train", max_distractors=0).remove_columns("image").to_list()
    one = syn.generate_split(12, seed=3, split="train", max_distractors=1).remove_columns("image").to_list()
    for row in capped:
        scene = json.loads(row["scene_graph"])
        assert _solve(row["question"], scene) == row["answer"]
        named = [b["label"] for b in row["boxes"]]
        assert sorted(o["name"] for o in scene["objects"].values()) == sorted(named)
    extra = [len(json.loads(r["scene_graph"])["objects"]) - len(r["boxes"]) for r in one]
    assert max(extra) == 1 and min(extra) >= 0
    full = syn.generate_split(12, seed=3, split="train").remove_columns("image").to_list()
    assert max(len(json.loads(r["scene_graph"])["objects"]) for r in full) == 4


def test_task_counts_weight_the_mix_without_changing_each_task_samples():
    weighted = syn.generate_split({"ChooseCat": 5, "QueryAttr": 2}, seed=3, split="train")
    assert Counter(weighted["task"]) == {"ChooseCat": 5, "QueryAttr": 2}
    # A task's samples depend on its own count only: the same 2 QueryAttr as when every task has 2.
    alone = syn.generate_split(2, seed=3, split="train", tasks=("QueryAttr",))
    assert weighted.remove_columns("image").to_list()[5:] == alone.remove_columns("image").to_list()
    for row in weighted.remove_columns("image").to_list():
        assert _solve(row["question"], json.loads(row["scene_graph"])) == row["answer"]


def test_vocabulary_covers_all_text(rows):
    vocab = set(scenes.synthetic_vocabulary())
    assert all(w == w.lower() for w in vocab)
    for row in rows:
        for text in (row["question"], row["answer"], row["true_option"] or "", row["false_option"] or ""):
            assert set(scenes.split_words(text)) <= vocab | set(scenes.SYNTHETIC_PUNCTUATION), text


def test_same_seed_same_bytes_other_seed_differs():
    a, b, c = syn.generate_split(4, seed=3), syn.generate_split(4, seed=3), syn.generate_split(4, seed=4)
    assert a.data.table.equals(b.data.table)
    assert not a.data.table.equals(c.data.table)
    assert a.features == syn.features()


def test_rows_hold_the_split_pixel_for_pixel():
    # The training stream reads generate_rows' in-memory images; evaluation reads generate_split's PNGs.
    options = dict(seed=5, split="train", hard=0.5, max_distractors=1)
    rows, split = syn.generate_rows(3, **options), syn.generate_split(3, **options)
    assert len(rows) == len(split) == 18
    for row, stored in zip(rows, split):
        assert {k: v for k, v in row.items() if k != "image"} == {k: v for k, v in stored.items() if k != "image"}
        assert row["image"].mode == stored["image"].mode == "RGB"
        assert np.array_equal(np.asarray(row["image"]), np.asarray(stored["image"]))


def test_save_is_atomic_and_load_or_generate_caches(tmp_path, monkeypatch):
    path = tmp_path / "world"
    first = syn.load_or_generate_world(path, n_per_task=10, seed=1)
    assert path.exists() and sorted(first) == ["test", "train", "validation"]
    assert [len(first[s]) for s in ("train", "validation", "test")] == [48, 6, 6]
    monkeypatch.setattr(syn, "generate_world", lambda *a, **k: pytest.fail("should load the cache"))
    again = syn.load_or_generate_world(path, n_per_task=10, seed=1)
    assert again["train"].data.table.equals(first["train"].data.table)

    class Broken:
        def save_to_disk(self, where):
            (tmp_path / where).mkdir()
            (tmp_path / where / "partial").write_text("half")
            raise OSError("disk full")

    with pytest.raises(OSError):
        syn.save_world(Broken(), tmp_path / "other")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["world"]


def test_to_samples_loads_images_lazily(world):
    samples = syn.to_samples(world["test"].select(range(12)))
    assert len(samples) == 12 and all(not isinstance(s.image, type(None)) for s in samples)
    s = samples[5]
    image = s.load_image()
    assert image.mode == "RGB" and image.size in scenes.IMAGE_SIZES
    assert s.boxes and s.validated_boxes(*image.size) == s.boxes
    assert s.source == "synthetic" and s.task in TASKS
    if s.true_option:
        assert s.answer == s.true_option and s.has_options


def test_preview_draws_boxes_and_title(world):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from flowlib.data import preview

    sample = next(s for s in syn.iter_samples(world["test"]) if len(s.boxes) == 2)
    fig, ax = preview(sample)
    assert len(ax.patches) == 2 and sample.answer in ax.get_title() and sample.question[:20] in ax.get_title()
    assert ax.get_images()[0].get_array().shape[:2] == (sample.load_image().height, sample.load_image().width)
    plt.close(fig)


def test_choose_false_options_appear_in_the_scene_only_by_chance():
    # As in GQA's choose questions: the false option is sometimes elsewhere in the scene (then only
    # binding the question to its object answers it) and sometimes nowhere.
    split = syn.generate_split(120, seed=5, split="train", tasks=("ChooseCat", "ChooseAttr"))
    present = defaultdict(list)
    for row in split.remove_columns("image"):
        objects = json.loads(row["scene_graph"])["objects"].values()
        values = {o["name"] for o in objects} | {a for o in objects for a in o["attributes"]}
        present[row["task"]].append(row["false_option"] in values)
    for task in ("ChooseCat", "ChooseAttr"):
        assert 0.25 < np.mean(present[task]) < 0.75, (task, np.mean(present[task]))


def _hard_case(row) -> bool:
    """Whether a ChooseCat or LogicalObj row is one a presence shortcut gets wrong."""
    objects = list(json.loads(row["scene_graph"])["objects"].values())
    words = row["question"].rstrip("?").split()
    if row["task"] == "ChooseCat":
        color = words[4]
        return any(o["name"] == row["false_option"] and o["color"] != color for o in objects)
    named, value = {words[4], words[7]}, words[-1]
    return any(o["name"] not in named and value in o["attributes"] for o in objects)


def test_hard_samples_defeat_the_presence_shortcuts_and_leave_other_tasks_alone():
    plain = syn.generate_split(40, seed=5, split="train").remove_columns("image").to_list()
    hard = syn.generate_split(40, seed=5, split="train", hard=1.0).remove_columns("image").to_list()
    for rows in (plain, hard):
        for row in rows:
            assert _solve(row["question"], json.loads(row["scene_graph"])) == row["answer"]
    cat = lambda rows: [_hard_case(r) for r in rows if r["task"] == "ChooseCat"]  # noqa: E731
    no = lambda rows: [_hard_case(r) for r in rows if r["task"] == "LogicalObj" and r["answer"] == "no"]  # noqa: E731
    assert all(cat(hard)) and all(no(hard))
    assert 0.2 < np.mean(cat(plain)) < 0.8 and np.mean(no(plain)) < 0.9  # chance presence without the option
    assert Counter(r["answer"] for r in hard if r["task"] == "LogicalObj") == {"yes": 20, "no": 20}
    others = lambda rows: [r for r in rows if r["task"] not in scenes.HARD_TASKS]  # noqa: E731
    assert others(hard) == others(plain)
    with pytest.raises(ValueError, match="from 0 to 1"):
        syn.generate_split(3, hard=1.5)
    # hard_tasks picks which tasks draw hard samples; the others' samples stay those of the plain split.
    cat_only = syn.generate_split(40, seed=5, split="train", hard=1.0, hard_tasks=("ChooseCat",))
    cat_only = cat_only.remove_columns("image").to_list()
    assert all(cat(cat_only)) and [r for r in cat_only if r["task"] != "ChooseCat"] == [
        r for r in plain if r["task"] != "ChooseCat"
    ]
    for bad in ("ChooseCat", ("QueryAttr",)):
        with pytest.raises(ValueError, match="hard_tasks"):
            syn.generate_split(3, hard=0.5, hard_tasks=bad)
