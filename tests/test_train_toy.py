"""The offline model's training (flowlib.toy): its per-patch targets, its stream, its turns and its determinism.

Two pins hold the committed recipe in place: the training stream's first chunks (token ids, pixels and
labels) and a short run's losses, both recorded from the code that trained the committed model.
"""

import dataclasses
import hashlib
import json

import numpy as np
import pytest
import torch

from flowlib import config as cfg
from flowlib.data.drawing import SHAPES
from flowlib.data.synthetic import generate_split
from flowlib.toy import __main__ as cli
from flowlib.toy import card as toy_card
from flowlib.toy import training
from flowlib.toy.model import ToyConfig, build_toy_model, toy_vocabulary
from flowlib.toy.patches import (
    PATCH_POSITIONS,
    PATCH_WORDS,
    PatchLoss,
    _patch_centres,
    patch_labels,
    patch_word_values,
)
from flowlib.toy.recipe import TrainConfig
from flowlib.toy.state import STATE_FILE, TrainingStateMismatch
from flowlib.toy.step import forward_shared_prefix
from flowlib.toy.stream import ChunkStream, batches, encode_chunk, encode_images
from flowlib.toy.training import train
from flowlib.toy.turns import DESCRIBE_REQUEST, NAMED_QUERY, describe_scene, named_query
from flowlib.toy.vision_pretrain import PRETRAIN_FIRST_CHUNK, pretrain_vision

#: A toy of the real geometry but two thin layers: builds and steps in well under a second.
SMALL = dataclasses.replace(ToyConfig(), vision_hidden=32, vision_layers=1, hidden=32, layers=2, heads=2)

#: The recipe at a tiny size: chunks of 12 samples (the recipe's task weights in whole counts), full scenes.
TINY = dataclasses.replace(TrainConfig(), chunk_per_task=2, batch_size=6, distractor_curriculum=())


def first_batch(recipe: TrainConfig = TINY):
    """The untrained SMALL toy and the first batch of its training stream (seed 3)."""
    loaded = build_toy_model(SMALL, seed=0)
    stream = ChunkStream(loaded.processor, SMALL, recipe, seed=3, workers=0)
    batch = next(batches(stream, pad_id=loaded.tokenizer.pad_token_id))
    stream.close()
    return loaded, batch


def turn_answers(text: str, opening: str) -> list[str]:
    """The answers of the turns `USER : <opening>...` in a decoded row."""
    return [turn.split("ASSISTANT : ")[1].split(" </s>")[0] for turn in text.split(f"USER : {opening}")[1:]]


def digest(chunk: dict, keys=("ids", "tasks", "questions", "answers", "queries", "descriptions")) -> str:
    digest_of = hashlib.sha256()
    for key in keys:
        digest_of.update(repr(chunk[key]).encode())
    for key in ("pixel_values", "patch_labels"):
        digest_of.update(chunk[key].numpy().tobytes())
    return digest_of.hexdigest()


@pytest.fixture(scope="module")
def scenes():
    return [json.loads(g) for g in generate_split(2, seed=5, split="train")["scene_graph"]]


# ----------------------------------------------------------------------------- the pins


@pytest.mark.parametrize(
    "k, expected",
    [
        (0, "42d29a110f9458630b881b2e714d688ad5473b630e7b0e1a639e118640f804b1"),  # curriculum: named objects only
        (200, "c13102fb2612f0ccbf3dca7d776c448e67c281fb57c292f5e0e729eda643c7a9"),  # full scenes
    ],
)
def test_the_recipes_training_stream_is_pinned(k, expected):
    # The model card's command reproduces the committed weights only while the recipe's stream stays the
    # same, token for token and pixel for pixel; a speed-up of the data path must keep it.
    chunk = encode_chunk(build_toy_model(ToyConfig(), seed=0).processor, ToyConfig(), TrainConfig(), seed=0, k=k)
    assert digest(chunk) == expected


@pytest.mark.parametrize(
    "i, expected",
    [
        (0, "620b34d0b492bf5b60776fe23bea7acb3d031db6bee9fdab0d3628d2be887af3"),  # the pool's first chunk
        (40, "af99c2d258e9dbec2a8499422f86a8313bd7e878ee1ef2a549e4e24c889384c9"),  # its held-out chunk
    ],
)
def test_the_vision_pretraining_pool_is_pinned(i, expected):
    processor = build_toy_model(ToyConfig(), seed=0).processor
    chunk = encode_images(processor, ToyConfig(), TrainConfig().chunk_per_task, seed=0, k=PRETRAIN_FIRST_CHUNK + i)
    assert digest(chunk, keys=()) == expected


#: Three batches of 4 a chunk (chunk_per_task=2: 12 samples), so a resumed run may start mid-chunk.
RESUMABLE = dataclasses.replace(
    TrainConfig(),
    steps=5,
    batch_size=4,
    chunk_per_task=2,
    warmup_steps=1,
    monitor_per_task=1,
    eval_every=2,
    threads=1,
    vision_pretrain_steps=2,
    vision_pretrain_chunks=1,
    vision_pretrain_batch=4,
)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("uninterrupted")
    train(SMALL, RESUMABLE, seed=7, out=out, workers=0, final_eval=False)
    return out


#: RESUMABLE's losses at each of its 5 steps, seed 7, as the code that trained the committed model logged them.
PINNED_LOSSES = {
    "loss": [4.629404067993164, 4.578059673309326, 4.659180641174316, 4.524264335632324, 4.527541637420654],
    "aux_loss": [4.511956214904785, 4.511385917663574, 4.510512351989746, 4.510150909423828, 4.509921073913574],
    "question_loss": [4.679900646209717, 4.681745529174805, 4.668956756591797, 4.6884284019470215, 4.650817394256592],
    "query_loss": [4.681640625, 4.686800956726074, 4.57153844833374, 4.574102401733398, 4.488467693328857],
    "describe_loss": [4.71413516998291, 4.681713581085205, 4.635961055755615, 4.6703619956970215, 4.631462097167969],
}


def test_a_short_run_of_the_recipe_is_pinned(uninterrupted):
    # Every loss of the recipe at every step: a change to the stream, the turns, the losses, their weights,
    # the optimizer's groups or the schedule moves them. The tolerance allows another processor's rounding.
    log = json.loads((uninterrupted / "log.json").read_text())
    for key, expected in PINNED_LOSSES.items():
        assert log[key] == pytest.approx(expected, rel=1e-4, abs=1e-5), key
    pretrained = json.loads((uninterrupted / "card.json").read_text())["training"]["vision_pretraining"]
    assert (pretrained["loss_first_tenth"], pretrained["loss_last_tenth"]) == pytest.approx((1.5891, 1.5849), abs=2e-4)


# ----------------------------------------------------------------------------- what the image tokens learn


def test_patch_labels_name_the_object_under_each_patch_centre(scenes):
    config = ToyConfig()
    values = patch_word_values()
    for scene in scenes:
        labels = patch_labels(scene, config).numpy()
        rows, cols = _patch_centres(scene["width"], scene["height"], config.image_size, config.patch_size)
        grid = len(rows)
        assert labels.shape == (grid * grid, len(PATCH_WORDS) + 2)
        covered = np.zeros(grid * grid, bool)
        for obj in scene["objects"].values():
            side = "left" if obj["x"] + obj["w"] / 2 < scene["width"] / 2 else "right"
            level = "above" if obj["y"] + obj["h"] / 2 < scene["height"] / 2 else "below"
            expected = [
                1 + values[k].index(v)
                for k, v in zip(
                    PATCH_WORDS, (obj["name"], obj["color"], obj["size"], obj["texture"], side, level), strict=True
                )
            ]
            for r in range(grid):
                for c in range(grid):
                    if obj["y"] <= rows[r] < obj["y"] + obj["h"] and obj["x"] <= cols[c] < obj["x"] + obj["w"]:
                        assert list(labels[r * grid + c, : len(PATCH_WORDS)]) == expected
                        covered[r * grid + c] = True
            assert covered.any(), "every object covers at least one patch centre"
        assert (labels[~covered, : len(PATCH_WORDS)] == 0).all()  # background and padding: no words
        assert list(labels[:, -2]) == [i // grid for i in range(grid * grid)]
        assert list(labels[:, -1]) == [i % grid for i in range(grid * grid)]


def test_patch_loss_rewards_image_tokens_that_spell_their_object():
    loaded = build_toy_model(SMALL, seed=0)
    loss = PatchLoss(loaded.model, loaded.tokenizer, SMALL)
    values = patch_word_values()
    labels = torch.zeros(1, 2, len(PATCH_WORDS) + 2, dtype=torch.long)
    labels[0, 0, : len(PATCH_WORDS)] = torch.tensor(
        [
            1 + values[k].index(w)
            for k, w in zip(PATCH_WORDS, ("star", "red", "small", "plain", "left", "below"), strict=True)
        ]
    )
    embeddings = loaded.model.get_input_embeddings().weight.detach()
    ids = loaded.tokenizer.convert_tokens_to_ids(["star", "red", "small", "plain", "left", "below"])
    others = [i for i in loss.word_ids.tolist() if i not in ids]
    spelled = embeddings[ids].sum(0) - embeddings[others].mean(0) * len(ids)
    aligned = torch.stack([spelled, -embeddings[loss.word_ids].sum(0)])[None] * 200
    shuffled = aligned.flip(1)  # the object's words on the background patch and vice versa
    with torch.no_grad():
        assert loss(aligned, labels) < loss(shuffled, labels) - 1.0


def test_vision_pretraining_trains_the_tower_and_projector_only(one_thread):
    config = dataclasses.replace(
        TrainConfig(), chunk_per_task=2, vision_pretrain_steps=100, vision_pretrain_chunks=2, vision_pretrain_batch=8
    )
    loaded = build_toy_model(SMALL, seed=0)
    before = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    result = pretrain_vision(loaded, SMALL, config, seed=0)
    changed = {n for n, p in loaded.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith(("model.vision_tower", "model.multi_modal_projector")) for n in changed)
    assert any(n.startswith("model.multi_modal_projector") for n in changed)
    assert set(result["held_out_patch_accuracy"]) == set(PATCH_WORDS + PATCH_POSITIONS)
    assert result["steps"] == 100
    assert result["loss_last_tenth"] < 0.8 * result["loss_first_tenth"]  # it learns, even this thin tower


# ----------------------------------------------------------------------------- the training-only turns


def test_the_turns_need_no_new_words():
    vocabulary = set(toy_vocabulary())
    for template in (DESCRIBE_REQUEST, NAMED_QUERY):
        words = template.replace("{shape}", "star").replace("{shape2}", "circle").replace("{value}", "large").split()
        assert set(words) <= vocabulary, set(words) - vocabulary


def test_descriptions_bind_each_objects_words_together(scenes):
    rng = np.random.default_rng(0)
    for scene in scenes:
        objects = describe_scene(scene, rng).split(" , ")
        assert len(objects) == len(scene["objects"])
        expected = []
        for obj in scene["objects"].values():
            side = "left" if obj["x"] + obj["w"] / 2 < scene["width"] / 2 else "right"
            level = "above" if obj["y"] + obj["h"] / 2 < scene["height"] / 2 else "below"
            expected.append({obj["name"], obj["color"], obj["size"], obj["texture"], side, level})
        assert sorted(map(sorted, (set(o.split()) for o in objects))) == sorted(map(sorted, expected))
        colors = [obj["color"] for obj in scene["objects"].values()]
        for words in (o.split() for o in objects):
            # The first word names one object: its shape, or its colour where no other object has it.
            assert words[0] in {o["name"] for o in scene["objects"].values()} or colors.count(words[0]) == 1


def test_named_queries_answer_with_the_named_shapes_that_have_the_value(scenes):
    rng = np.random.default_rng(0)
    answers, no_but_seen = [], 0
    for scene in scenes * 30:
        question, answer = named_query(scene, rng)
        first, rest = question.removeprefix("which of a ").removesuffix(" ?").split(" or a ")
        second, value = rest.split(" is ")
        assert first != second and {first, second} <= set(SHAPES)
        having = [
            s
            for s in SHAPES
            if any(o["name"] == s and value in o["attributes"] for o in scene["objects"].values())
            and s in (first, second)
        ]
        expected = " , ".join(having) or "no"
        assert answer == expected[:1].upper() + expected[1:]  # capitalised: "No" is LogicalObj's answer word
        no_but_seen += answer == "No" and any(value in o["attributes"] for o in scene["objects"].values())
        answers.append(answer)
    n = len(answers)
    assert 0.4 < answers.count("No") / n < 0.6
    assert no_but_seen / answers.count("No") > 0.5  # most "No" scenes hold the value on an unnamed shape
    question, answer = named_query({"objects": {}}, rng)  # the curriculum's empty LogicalObj "no" scenes
    assert question.startswith("which of a ") and answer == "No"


# ----------------------------------------------------------------------------- the stream and its batches


def test_batches_label_the_answer_the_question_words_the_named_query_and_the_description():
    loaded, batch = first_batch()
    tokenizer = loaded.tokenizer
    answer_word = tokenizer.convert_tokens_to_ids("ASSISTANT")
    for row, labels, question_labels, query_labels, describe_labels in zip(
        batch["input_ids"], batch["labels"], batch["question_labels"], batch["query_labels"], batch["describe_labels"]
    ):
        # The answer follows the first turn's "ASSISTANT:", exactly where evaluation reads it.
        first_assistant = row.tolist().index(answer_word)
        assert (labels != -100).nonzero().flatten().tolist() == [first_assistant + 2, first_assistant + 3]
        answer = tokenizer.convert_ids_to_tokens(labels[labels != -100].tolist())
        assert answer[0][:1].isupper() and answer[1] == tokenizer.eos_token
        words = tokenizer.convert_ids_to_tokens(question_labels[question_labels != -100].tolist())
        text = tokenizer.decode(row[row != tokenizer.pad_token_id])
        assert " ".join(words) in text and words[-1] == "?" and len(words) >= 6
        # Then one named query, only its answer and </s> labelled, then the description.
        answers = turn_answers(text, "which of a ")
        assert len(answers) == 1 and tokenizer.decode(query_labels[query_labels != -100]) == answers[0] + " </s>"
        assert text.index("USER : which of a ") < text.index("USER : what is in the image ? ASSISTANT :")
        at = (query_labels != -100).nonzero().flatten()
        assert (labels != -100).nonzero().max() < at.min() and at.max() < (describe_labels != -100).nonzero().min()
        described = tokenizer.convert_ids_to_tokens(describe_labels[describe_labels != -100].tolist())
        objects = " ".join(described[:-1]).split(" , ")
        assert described[-1] == tokenizer.eos_token and 2 <= len(objects) <= 4
        assert all(len(o.split()) == 6 for o in objects)


def test_the_shared_prefix_forward_gives_the_plain_logits():
    loaded, batch = first_batch()
    tokenizer = loaded.tokenizer
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        plain = loaded.model(**inputs, use_cache=False).logits
        shared, prefix = forward_shared_prefix(loaded.model, inputs)
    # The system prompt and "USER :", up to the first image token.
    assert tokenizer.decode(batch["input_ids"][0, prefix - 2 : prefix + 1]) == "USER : <image>"
    assert shared.shape[1] == plain.shape[1] - prefix
    torch.testing.assert_close(shared, plain[:, prefix:], atol=1e-5, rtol=1e-4)


def test_distractor_curriculum_caps_the_first_chunks():
    # Chunks of 32 x 6 samples = 12 steps of 16; a chunk takes the stage of its first step.
    assert TrainConfig(distractor_curriculum=((600, 0), (1200, 1))).distractor_caps() == (0,) * 50 + (1,) * 50
    assert TrainConfig(distractor_curriculum=((601, 0),)).distractor_caps() == (0,) * 51
    loaded = build_toy_model(SMALL, seed=0)
    recipe = dataclasses.replace(TINY, batch_size=12, distractor_curriculum=((1, 0),))
    stream = ChunkStream(loaded.processor, SMALL, recipe, seed=3, workers=0)
    objects = []
    for _ in range(2):
        chunk = stream.next()
        objects.append(
            [
                chunk["ids"][i][start:end].count(loaded.tokenizer.convert_tokens_to_ids(",")) + 1
                for i, (start, end) in enumerate(chunk["descriptions"])
            ]
        )
    assert max(objects[0]) <= 2  # chunk 0: only the objects the question names (one or two)
    assert max(objects[1]) >= 3  # chunk 1: full scenes


def test_task_weights_share_a_chunk_in_whole_counts():
    assert TrainConfig().chunk_size() == 192  # the recipe's weights split its chunk exactly
    assert TINY.task_counts() == {
        "ChooseAttr": 1,
        "ChooseCat": 3,
        "ChooseRel": 3,
        "CompareAttr": 2,
        "LogicalObj": 2,
        "QueryAttr": 1,
    }
    chunk = encode_chunk(build_toy_model(SMALL).processor, SMALL, TINY, seed=3, k=0)
    assert sorted(chunk["tasks"]) == sorted(task for task, n in TINY.task_counts().items() for _ in range(n))
    with pytest.raises(ValueError, match="whole counts"):
        TrainConfig(chunk_per_task=1).task_counts()
    with pytest.raises(ValueError, match="unknown tasks"):
        TrainConfig(task_weights=(("ChooseColour", 1),)).task_counts()


def test_the_stream_is_the_same_for_any_number_of_workers():
    loaded = build_toy_model(SMALL, seed=0)
    hard = dataclasses.replace(TINY, hard_negatives=1.0)
    chunks = {}
    for workers in (0, 2):
        stream = ChunkStream(loaded.processor, SMALL, hard, seed=3, workers=workers)
        chunks[workers] = [stream.next() for _ in range(3)]
        stream.close()
    for inline, ahead in zip(chunks[0], chunks[2]):
        assert inline["ids"] == ahead["ids"] and inline["answers"] == ahead["answers"]
        assert torch.equal(inline["pixel_values"], ahead["pixel_values"])
    assert chunks[0][0]["ids"] != chunks[0][1]["ids"]
    # The hard share reaches the chunks (and through the workers' arguments, by the equality above).
    plain = encode_chunk(loaded.processor, SMALL, dataclasses.replace(TINY, hard_negatives=0.0), seed=3, k=0)
    assert not torch.equal(plain["pixel_values"], chunks[0][0]["pixel_values"])


def test_a_data_workers_error_stops_the_trainer_at_once():
    loaded = build_toy_model(SMALL, seed=0)
    stream = ChunkStream(loaded.processor, SMALL, dataclasses.replace(TINY, hard_negatives=1.5), seed=3, workers=1)
    try:
        with pytest.raises(RuntimeError, match="data worker failed on chunk 0: ValueError.*from 0 to 1"):
            stream.next()
    finally:
        stream.close()


# ----------------------------------------------------------------------------- runs: determinism and resuming


def test_same_seed_gives_bit_identical_weights(tmp_path, one_thread):
    config = dataclasses.replace(RESUMABLE, steps=3, eval_every=1000)
    for run, seed in (("a", 7), ("b", 7), ("c", 8)):
        torch.manual_seed(ord(run))  # training must not depend on the global generator's state
        train(SMALL, config, seed=seed, out=tmp_path / run, workers=0, final_eval=False)
    weights = {run: (tmp_path / run / "model.safetensors").read_bytes() for run in "abc"}
    assert weights["a"] == weights["b"]
    assert weights["a"] != weights["c"]
    training_record = json.loads((tmp_path / "a" / "card.json").read_text())["training"]
    assert training_record["steps"] == 3
    # the same bytes can only be expected on the same processor and kernels, so the card names both
    assert training_record["device"].endswith(f", {torch.backends.cpu.get_cpu_capability()} kernels, 1 threads)")


@pytest.mark.parametrize("save_every, fails_at, workers", [(2, 3, 0), (3, 4, 1)])  # mid-chunk; a chunk's start
def test_an_interrupted_run_resumes_to_the_same_weights(
    tmp_path, monkeypatch, one_thread, uninterrupted, save_every, fails_at, workers
):
    schedule = training.lr_at

    def failing(step, config):
        if step == fails_at:
            raise KeyboardInterrupt
        return schedule(step, config)

    monkeypatch.setattr(training, "lr_at", failing)
    with pytest.raises(KeyboardInterrupt):
        train(SMALL, RESUMABLE, seed=7, out=tmp_path, workers=workers, final_eval=False, save_every=save_every)
    state = torch.load(tmp_path / STATE_FILE, weights_only=True)
    assert state["steps_done"] == save_every and len(state["log"]["loss"]) == save_every
    monkeypatch.setattr(training, "lr_at", schedule)
    with pytest.raises(TrainingStateMismatch, match=r"seed 7 \(now 8\).*--fresh"):
        train(SMALL, RESUMABLE, seed=8, out=tmp_path, workers=0, final_eval=False)
    train(SMALL, RESUMABLE, seed=7, out=tmp_path, workers=workers, final_eval=False, save_every=save_every)
    assert (tmp_path / "model.safetensors").read_bytes() == (uninterrupted / "model.safetensors").read_bytes()
    resumed, whole = (json.loads((folder / "log.json").read_text()) for folder in (tmp_path, uninterrupted))
    assert resumed == whole  # the losses and monitor scores of every step, the saved ones included
    assert not (tmp_path / STATE_FILE).exists()  # a finished run leaves no state behind


def test_a_run_out_of_minutes_keeps_its_state_and_the_same_command_finishes_it(tmp_path, one_thread, uninterrupted):
    card = train(SMALL, RESUMABLE, seed=7, out=tmp_path, workers=0, final_eval=False, minutes=0)
    assert card["training"]["steps"] == 0 and (tmp_path / STATE_FILE).exists()
    card = train(SMALL, RESUMABLE, seed=7, out=tmp_path, workers=0, final_eval=False)
    assert card["training"]["steps"] == 5
    assert (tmp_path / "model.safetensors").read_bytes() == (uninterrupted / "model.safetensors").read_bytes()
    assert not (tmp_path / STATE_FILE).exists()


def test_fresh_deletes_a_saved_state_and_starts_over(tmp_path, one_thread, uninterrupted):
    train(SMALL, dataclasses.replace(RESUMABLE, lr=1e-2), seed=7, out=tmp_path, workers=0, final_eval=False, minutes=0)
    train(SMALL, RESUMABLE, seed=7, out=tmp_path, workers=0, final_eval=False, fresh=True)
    assert (tmp_path / "model.safetensors").read_bytes() == (uninterrupted / "model.safetensors").read_bytes()


# ----------------------------------------------------------------------------- the command line and the card


def test_the_command_line_refuses_another_runs_state_in_one_line(monkeypatch, capsys):
    def mismatch(*args, **kwargs):
        raise TrainingStateMismatch("out/training_state.pt holds the saved state of a run with other settings")

    monkeypatch.setattr(training, "train", mismatch)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--out", "out"])
    assert exit_info.value.code == 2
    assert (
        capsys.readouterr().err == "error: out/training_state.pt holds the saved state of a run with other settings\n"
    )
    with pytest.raises(SystemExit):
        cli.main(["--save-every", "-1"])
    assert "--save-every -1: give a number of steps, or 0" in capsys.readouterr().err


def test_the_model_card_names_the_command_that_reproduces_the_run():
    assert toy_card.command_line(TrainConfig().to_dict(), seed=3) == "python -m flowlib.toy --seed 3"
    changed = dataclasses.replace(TrainConfig(), steps=1234, threads=4)
    command = toy_card.command_line(json.loads(json.dumps(changed.to_dict())), seed=5)
    assert command == "python -m flowlib.toy --seed 5 --steps 1234 --threads 4"
    args = cli.build_parser().parse_args(command.split(" ")[3:])
    assert args.seed == 5 and cli.train_config_from_args(args) == changed
    # A setting no flag reaches: the Python call, which rebuilds the same config.
    changed = dataclasses.replace(changed, batch_size=8, distractor_curriculum=((10, 0),))
    call = toy_card.command_line(json.loads(json.dumps(changed.to_dict())), seed=5)
    prefix, suffix = "flowlib.toy.training.train(ToyConfig(), ", ", seed=5)"
    assert call.startswith(prefix) and call.endswith(suffix)
    assert eval(call.removeprefix(prefix).removesuffix(suffix), {"TrainConfig": TrainConfig}) == changed


def test_the_committed_model_card_renders_from_its_json():
    folder = cfg.SHORT_NAMES[cfg.OFFLINE_MODEL]
    card = json.loads((folder / "card.json").read_text())
    committed = (folder / "MODEL_CARD.md").read_text()
    assert toy_card.model_card_markdown(card) == committed
    # bit-identity on the same processor was measured on CPUs only, so a GPU run's card does not claim it
    card["training"]["device"] = "NVIDIA H200, data on 6 CPU worker process(es)"
    assert "Deterministic" not in toy_card.model_card_markdown(card)
