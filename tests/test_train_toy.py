"""The offline model's training script: its per-patch targets, its labels and its determinism."""

import dataclasses
import hashlib
import json

import numpy as np
import pytest
import torch

from flowlib import train_toy
from flowlib.data.synthetic import ATTRIBUTES, COLORS, HARD_TASKS, SHAPES, generate_split
from flowlib.sample import TASKS
from flowlib.toy_model import ToyConfig, build_toy_model
from flowlib.train_toy import (
    PATCH_POSITIONS,
    PATCH_WORDS,
    ChunkStream,
    PatchLoss,
    TrainConfig,
    _patch_centres,
    attribute_query,
    batches,
    chunk_size,
    describe_scene,
    distractor_caps,
    forward_shared_prefix,
    named_query,
    parse_task_weights,
    patch_labels,
    patch_word_values,
    pretrain_vision,
    train,
    verify_query,
)

#: A toy of the real geometry but two thin layers: builds and steps in well under a second.
SMALL = dataclasses.replace(ToyConfig(), vision_hidden=32, vision_layers=1, hidden=32, layers=2, heads=2)


def first_batch(**stream_options):
    """The untrained SMALL toy and the first batch of 6 of its training stream (seed 3, one sample per task)."""
    loaded = build_toy_model(SMALL, seed=0)
    stream = ChunkStream(loaded.processor, SMALL, seed=3, per_task=1, workers=0, **stream_options)
    batch = next(batches(stream, batch_size=6, pad_id=loaded.tokenizer.pad_token_id))
    stream.close()
    return loaded, batch


def turn_answers(text: str, opening: str) -> list[str]:
    """The answers of the turns `USER : <opening>...` in a decoded row."""
    return [turn.split("ASSISTANT : ")[1].split(" </s>")[0] for turn in text.split(f"USER : {opening}")[1:]]


@pytest.fixture(scope="module")
def scenes():
    return [json.loads(g) for g in generate_split(2, seed=5, split="train")["scene_graph"]]


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


def test_batches_label_the_answer_the_question_words_and_the_description():
    loaded, batch = first_batch()
    tokenizer = loaded.tokenizer
    answer_word = tokenizer.convert_tokens_to_ids("ASSISTANT")
    for row, labels, question_labels, describe_labels in zip(
        batch["input_ids"], batch["labels"], batch["question_labels"], batch["describe_labels"]
    ):
        # The answer follows the first turn's "ASSISTANT:", exactly where evaluation reads it.
        first_assistant = row.tolist().index(answer_word)
        assert (labels != -100).nonzero().flatten().tolist() == [first_assistant + 2, first_assistant + 3]
        answer = tokenizer.convert_ids_to_tokens(labels[labels != -100].tolist())
        assert answer[0][:1].isupper() and answer[1] == tokenizer.eos_token
        words = tokenizer.convert_ids_to_tokens(question_labels[question_labels != -100].tolist())
        text = tokenizer.decode(row[row != tokenizer.pad_token_id])
        assert " ".join(words) in text and words[-1] == "?" and len(words) >= 6
        described = tokenizer.convert_ids_to_tokens(describe_labels[describe_labels != -100].tolist())
        objects = " ".join(described[:-1]).split(" , ")
        assert described[-1] == tokenizer.eos_token and 2 <= len(objects) <= 4
        assert all(len(o.split()) == 6 for o in objects)
        assert "what is in the image ? ASSISTANT :" in text
    # Without the description turn the sequence ends with the answer's </s>.
    _, batch = first_batch(describe=False)
    assert (batch["describe_labels"] == -100).all()
    lengths = batch["attention_mask"].sum(1)
    assert all(
        row[n - 1] == tokenizer.eos_token_id and labels[n - 1] == tokenizer.eos_token_id
        for row, labels, n in zip(batch["input_ids"], batch["labels"], lengths)
    )


def test_extra_question_turns_come_between_the_answer_and_the_description():
    loaded, batch = first_batch(extra_questions=3)
    tokenizer = loaded.tokenizer
    assistant, eos = tokenizer.convert_tokens_to_ids("ASSISTANT"), tokenizer.eos_token_id
    turns = []
    for row, labels, describe_labels in zip(batch["input_ids"], batch["labels"], batch["describe_labels"]):
        row = row.tolist()
        answer_at = [i for i in (labels != -100).nonzero().flatten().tolist() if labels[i] != eos]
        # Every answer word follows an "ASSISTANT :" and is followed by </s>; the first is the evaluation's.
        assert all(row[i - 2] == assistant and row[i + 1] == eos and labels[i + 1] == eos for i in answer_at)
        assert answer_at[0] == row.index(assistant) + 2
        assert all(tokenizer.convert_ids_to_tokens(row[i])[:1].isupper() for i in answer_at)
        # The extra turns repeat the instruction, without the image, before the description turn.
        text = tokenizer.decode([t for t in row if t != tokenizer.pad_token_id])
        assert text.count("using a single word or phrase") == len(answer_at)
        assert text.count("<image>") == (SMALL.image_size // SMALL.patch_size) ** 2  # the first turn's only
        assert max(answer_at) < (describe_labels != -100).nonzero().min()
        turns.append(len(answer_at))
    assert max(turns) == 4 and min(turns) >= 2  # up to 3 extra turns; a scene may not allow every task


def test_extra_question_turns_ask_only_the_chosen_tasks():
    loaded, batch = first_batch(extra_questions=2, extra_question_tasks=("LogicalObj",))
    tokenizer, eos = loaded.tokenizer, loaded.tokenizer.eos_token_id
    extra_answers = []
    for row, labels in zip(batch["input_ids"], batch["labels"]):
        answer_at = [i for i in (labels != -100).nonzero().flatten().tolist() if labels[i] != eos]
        extra_answers += tokenizer.convert_ids_to_tokens([int(row[i]) for i in answer_at[1:]])
        text = tokenizer.decode([t for t in row if t != tokenizer.pad_token_id])
        # Every extra turn is LogicalObj's question (the evaluation's turn may be one too).
        assert len(answer_at) - 1 <= text.count("is there either a ") <= len(answer_at)
    assert len(extra_answers) >= 8 and set(extra_answers) == {"Yes", "No"}


def test_distractor_curriculum_caps_the_first_chunks():
    # Chunks of 32 x 6 samples = 12 steps of 16; a chunk takes the stage of its first step.
    assert distractor_caps(32, 16, ((600, 0), (1200, 1))) == (0,) * 50 + (1,) * 50
    assert distractor_caps(32, 16, ((601, 0),)) == (0,) * 51
    loaded = build_toy_model(SMALL, seed=0)
    stream = ChunkStream(loaded.processor, SMALL, seed=3, per_task=2, workers=0, curriculum=((1, 0),), batch_size=12)
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


def test_attribute_queries_name_the_shapes_that_have_the_value(scenes):
    rng = np.random.default_rng(0)
    asked, empty = set(), 0
    for scene in scenes * 10:
        question, answer = attribute_query(scene, rng)
        value = question.removeprefix("which shape is ").removesuffix(" ?")
        having = [o["name"] for o in scene["objects"].values() if value in (o["color"], o["size"], o["texture"])]
        if having:
            assert answer.split(" , ") == [s for s in SHAPES if s in having]  # one spelling: SHAPES order
        else:
            assert answer == "no"
            empty += 1
        asked.add(value)
    assert {"small", "large", "plain", "striped"} <= asked and asked & set(COLORS)  # every kind is asked
    assert 0 < empty < len(scenes) * 10


def test_attribute_query_turns_come_after_the_answer_and_before_the_description():
    loaded, batch = first_batch(attribute_queries=2)
    tokenizer = loaded.tokenizer
    for row, labels, query_labels, describe_labels in zip(
        batch["input_ids"], batch["labels"], batch["query_labels"], batch["describe_labels"]
    ):
        text = tokenizer.decode(row[row != tokenizer.pad_token_id])
        answers = turn_answers(text, "which shape is ")
        assert len(answers) == 2
        labelled = tokenizer.decode(query_labels[query_labels != -100])
        assert labelled == " </s> ".join(answers) + " </s>"  # only the answers and their </s> are labelled
        at = (query_labels != -100).nonzero().flatten()
        assert (labels != -100).nonzero().max() < at.min() and at.max() < (describe_labels != -100).nonzero().min()


def test_verify_queries_check_one_shape_and_answer_yes_half_the_time(scenes):
    rng = np.random.default_rng(0)
    answers, absent, kinds = [], 0, set()
    for scene in scenes * 30:
        question, answer = verify_query(scene, rng)
        shape, value = question.removeprefix("is there a ").removesuffix(" ?").split(" that is ")
        holds = [o for o in scene["objects"].values() if o["name"] == shape]
        assert answer == ("Yes" if any(value in o["attributes"] for o in holds) else "No")
        absent += not holds
        kinds.add(next(kind for kind, values in ATTRIBUTES.items() if value in values))
        answers.append(answer)
    n = len(answers)
    assert 0.4 < answers.count("Yes") / n < 0.6 and 0.1 < absent / n < 0.25 and kinds == set(ATTRIBUTES)
    question, answer = verify_query({"objects": {}}, rng)  # the curriculum's empty LogicalObj "no" scenes
    assert question.startswith("is there a ") and answer == "No"


def test_verify_query_turns_are_answered_yes_or_no_after_the_attribute_queries():
    loaded, batch = first_batch(attribute_queries=1, verify_queries=2)
    tokenizer = loaded.tokenizer
    for row, query_labels in zip(batch["input_ids"], batch["query_labels"]):
        text = tokenizer.decode(row[row != tokenizer.pad_token_id])
        assert text.index("USER : which shape is ") < text.index("USER : is there a ")
        answers = turn_answers(text, "is there a ")
        assert len(answers) == 2 and set(answers) <= {"Yes", "No"}  # capitalised, as the first answer word
        assert tokenizer.decode(query_labels[query_labels != -100]).endswith(" </s> ".join(answers) + " </s>")


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


def test_named_query_turns_come_after_the_verify_queries_and_before_the_description():
    loaded, batch = first_batch(verify_queries=1, named_queries=2)
    tokenizer = loaded.tokenizer
    for row, query_labels in zip(batch["input_ids"], batch["query_labels"]):
        text = tokenizer.decode(row[row != tokenizer.pad_token_id])
        assert text.index("USER : is there a ") < text.index("USER : which of a ") < text.index("USER : what is in")
        answers = turn_answers(text, "which of a ")
        assert len(answers) == 2 and all(
            a == "No" or a.split(" , ")[0] in {s.capitalize() for s in SHAPES} for a in answers
        )
        assert tokenizer.decode(query_labels[query_labels != -100]).endswith(" </s> ".join(answers) + " </s>")


def test_the_shared_prefix_forward_gives_the_plain_logits():
    loaded, batch = first_batch(attribute_queries=1)
    tokenizer = loaded.tokenizer
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        plain = loaded.model(**inputs, use_cache=False).logits
        shared, prefix = forward_shared_prefix(loaded.model, inputs)
    # The system prompt and "USER :", up to the first image token.
    assert tokenizer.decode(batch["input_ids"][0, prefix - 2 : prefix + 1]) == "USER : <image>"
    assert shared.shape[1] == plain.shape[1] - prefix
    torch.testing.assert_close(shared, plain[:, prefix:], atol=1e-5, rtol=1e-4)


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


def test_the_stream_is_the_same_for_any_number_of_workers():
    loaded = build_toy_model(SMALL, seed=0)
    chunks = {}
    for workers in (0, 2):
        stream = ChunkStream(loaded.processor, SMALL, seed=3, per_task=1, workers=workers, extra_questions=2, hard=1.0)
        chunks[workers] = [stream.next() for _ in range(3)]
        stream.close()
    for inline, ahead in zip(chunks[0], chunks[2]):
        assert inline["ids"] == ahead["ids"] and inline["answers"] == ahead["answers"]
        assert torch.equal(inline["pixel_values"], ahead["pixel_values"])
    assert chunks[0][0]["ids"] != chunks[0][1]["ids"]
    # The hard share reaches the chunks (and through the workers' arguments, by the equality above).
    plain = train_toy.encode_chunk(loaded.processor, 3, 0, 1, SMALL, extra_questions=2)
    assert not torch.equal(plain["pixel_values"], chunks[0][0]["pixel_values"])


@pytest.mark.parametrize(
    "k, digest",
    [
        (0, "42d29a110f9458630b881b2e714d688ad5473b630e7b0e1a639e118640f804b1"),  # curriculum: named objects only
        (200, "c13102fb2612f0ccbf3dca7d776c448e67c281fb57c292f5e0e729eda643c7a9"),  # full scenes
    ],
)
def test_the_default_training_stream_is_pinned(k, digest):
    # The model card's command reproduces the committed weights only while the default recipe's stream
    # stays the same, token for token and pixel for pixel; a speed-up of the data path must keep it.
    train_config = TrainConfig()
    assert set(train_config.chunk_options()) == set(train_toy.CHUNK_OPTIONS)  # the whole recipe is pinned
    caps = distractor_caps(train_config.task_counts(), train_config.batch_size, train_config.distractor_curriculum)
    chunk = train_toy.encode_chunk(
        build_toy_model(ToyConfig(), seed=0).processor,
        0,
        k,
        train_config.task_counts(),
        max_distractors=caps[k] if k < len(caps) else None,
        **train_config.chunk_options(),
    )
    digest_of = hashlib.sha256()
    for key in ("ids", "tasks", "questions", "answers", "queries", "descriptions"):
        digest_of.update(repr(chunk[key]).encode())
    for key in ("pixel_values", "patch_labels"):
        digest_of.update(chunk[key].numpy().tobytes())
    assert digest_of.hexdigest() == digest


def test_a_data_workers_error_stops_the_trainer_at_once():
    loaded = build_toy_model(SMALL, seed=0)
    stream = ChunkStream(loaded.processor, SMALL, seed=3, per_task=1, workers=1, hard=1.5)
    try:
        with pytest.raises(RuntimeError, match="data worker failed on chunk 0: ValueError.*from 0 to 1"):
            stream.next()
    finally:
        stream.close()


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


def test_same_seed_gives_bit_identical_weights(tmp_path, one_thread):
    config = dataclasses.replace(
        TrainConfig(),
        steps=3,
        batch_size=4,
        chunk_per_task=2,
        warmup_steps=1,
        monitor_per_task=1,
        eval_every=1000,
        threads=1,
        vision_pretrain_steps=2,
        vision_pretrain_chunks=1,
        vision_pretrain_batch=4,
    )
    for run, seed in (("a", 7), ("b", 7), ("c", 8)):
        torch.manual_seed(ord(run))  # training must not depend on the global generator's state
        train(SMALL, config, seed=seed, out=tmp_path / run, workers=0, final_eval=False)
    weights = {run: (tmp_path / run / "model.safetensors").read_bytes() for run in "abc"}
    assert weights["a"] == weights["b"]
    assert weights["a"] != weights["c"]
    training = json.loads((tmp_path / "a" / "card.json").read_text())["training"]
    assert training["steps"] == 3
    # the same bytes can only be expected on the same processor and kernels, so the card names both
    assert training["device"].endswith(f", {torch.backends.cpu.get_cpu_capability()} kernels, 1 threads)")


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


@pytest.mark.parametrize("save_every, fails_at, workers", [(2, 3, 0), (3, 4, 1)])  # mid-chunk; a chunk's start
def test_an_interrupted_run_resumes_to_the_same_weights(
    tmp_path, monkeypatch, one_thread, uninterrupted, save_every, fails_at, workers
):
    schedule = train_toy.lr_at

    def failing(step, config):
        if step == fails_at:
            raise KeyboardInterrupt
        return schedule(step, config)

    monkeypatch.setattr(train_toy, "lr_at", failing)
    with pytest.raises(KeyboardInterrupt):
        train(SMALL, RESUMABLE, seed=7, out=tmp_path, workers=workers, final_eval=False, save_every=save_every)
    state = torch.load(tmp_path / train_toy.STATE_FILE, weights_only=True)
    assert state["steps_done"] == save_every and len(state["log"]["loss"]) == save_every
    monkeypatch.setattr(train_toy, "lr_at", schedule)
    with pytest.raises(train_toy.TrainingStateMismatch, match=r"seed 7 \(now 8\).*--fresh"):
        train(SMALL, RESUMABLE, seed=8, out=tmp_path, workers=0, final_eval=False)
    train(SMALL, RESUMABLE, seed=7, out=tmp_path, workers=workers, final_eval=False, save_every=save_every)
    assert (tmp_path / "model.safetensors").read_bytes() == (uninterrupted / "model.safetensors").read_bytes()
    resumed, whole = (json.loads((folder / "log.json").read_text()) for folder in (tmp_path, uninterrupted))
    assert resumed == whole  # the losses and monitor scores of every step, the saved ones included
    assert not (tmp_path / train_toy.STATE_FILE).exists()  # a finished run leaves no state behind


def test_a_run_out_of_minutes_keeps_its_state_and_the_same_command_finishes_it(tmp_path, one_thread, uninterrupted):
    card = train(SMALL, RESUMABLE, seed=7, out=tmp_path, workers=0, final_eval=False, minutes=0)
    assert card["training"]["steps"] == 0 and (tmp_path / train_toy.STATE_FILE).exists()
    card = train(SMALL, RESUMABLE, seed=7, out=tmp_path, workers=0, final_eval=False)
    assert card["training"]["steps"] == 5
    assert (tmp_path / "model.safetensors").read_bytes() == (uninterrupted / "model.safetensors").read_bytes()
    assert not (tmp_path / train_toy.STATE_FILE).exists()


def test_fresh_deletes_a_saved_state_and_starts_over(tmp_path, one_thread, uninterrupted):
    train(SMALL, dataclasses.replace(RESUMABLE, lr=1e-2), seed=7, out=tmp_path, workers=0, final_eval=False, minutes=0)
    train(SMALL, RESUMABLE, seed=7, out=tmp_path, workers=0, final_eval=False, fresh=True)
    assert (tmp_path / "model.safetensors").read_bytes() == (uninterrupted / "model.safetensors").read_bytes()


def test_the_command_line_refuses_another_runs_state_in_one_line(monkeypatch, capsys):
    def mismatch(*args, **kwargs):
        raise train_toy.TrainingStateMismatch(
            "out/training_state.pt holds the saved state of a run with other settings"
        )

    monkeypatch.setattr(train_toy, "train", mismatch)
    with pytest.raises(SystemExit) as exit_info:
        train_toy.main(["--out", "out"])
    assert exit_info.value.code == 2
    assert (
        capsys.readouterr().err == "error: out/training_state.pt holds the saved state of a run with other settings\n"
    )
    with pytest.raises(SystemExit):
        train_toy.main(["--save-every", "-1"])
    assert "--save-every -1: give a number of steps, or 0" in capsys.readouterr().err


def test_the_learning_rate_holds_its_peak_until_the_decay_starts():
    cosine = TrainConfig(steps=1100, warmup_steps=100)
    held = dataclasses.replace(cosine, decay_start=0.6)
    assert train_toy.lr_at(0, held) == train_toy.lr_at(0, cosine) == cosine.lr / 100  # the same warmup
    assert train_toy.lr_at(100, cosine) == cosine.lr
    assert train_toy.lr_at(600, cosine) == pytest.approx(cosine.lr * (0.05 + 0.95 * 0.5))  # half-way down
    assert train_toy.lr_at(700, held) == cosine.lr  # still the peak after 60% of the 1000 steps
    assert train_toy.lr_at(900, held) == pytest.approx(cosine.lr * (0.05 + 0.95 * 0.5))  # half-way down
    assert train_toy.lr_at(1100, held) == train_toy.lr_at(1100, cosine) == pytest.approx(cosine.lr * 0.05)
    parse = train_toy.build_parser().parse_args
    assert train_toy.train_config_from_args(parse(["--decay-start", "0.6"])).decay_start == 0.6
    with pytest.raises(ValueError, match="decay_start 1.0: give a share of the steps from 0 to below 1"):
        train_toy.train_config_from_args(parse(["--decay-start", "1"]))


def test_task_weights_share_a_chunk_in_whole_counts():
    assert TrainConfig(task_weights=()).task_counts() == {task: 32 for task in TASKS}  # empty: equal shares
    assert chunk_size(TrainConfig().task_counts()) == 192  # the default's weights split its chunk exactly
    weighted = TrainConfig(chunk_per_task=2, task_weights=(("ChooseCat", 3), ("CompareAttr", 2), ("QueryAttr", 1)))
    assert weighted.task_counts() == {"ChooseCat": 6, "CompareAttr": 4, "QueryAttr": 2}
    assert chunk_size(weighted.task_counts()) == chunk_size(2) == 12
    with pytest.raises(ValueError, match="whole counts"):
        TrainConfig(chunk_per_task=1, task_weights=(("ChooseCat", 1), ("QueryAttr", 4))).task_counts()
    with pytest.raises(ValueError, match="unknown tasks"):
        TrainConfig(task_weights=(("ChooseColour", 1),)).task_counts()


def test_stream_follows_the_task_counts_and_their_chunk_size():
    loaded = build_toy_model(SMALL)
    counts = {"ChooseCat": 3, "QueryAttr": 1}
    stream = ChunkStream(
        loaded.processor, SMALL, seed=3, per_task=counts, workers=0, curriculum=((1, 0),), batch_size=2
    )
    assert stream.caps == (0,)  # the curriculum's one step is the first chunk's (4 samples, 2 batches)
    chunk = stream.next()
    assert sorted(chunk["tasks"]) == ["ChooseCat"] * 3 + ["QueryAttr"]
    with pytest.raises(TypeError, match="hard_negatives"):  # before any worker starts
        ChunkStream(loaded.processor, SMALL, seed=3, per_task=counts, hard_negatives=0.5)


def test_hard_tasks_from_the_command_line():
    assert train_toy.parse_tasks("LogicalObj, ChooseCat", "--hard-tasks", HARD_TASKS) == ("LogicalObj", "ChooseCat")
    for bad in ("QueryAttr", ""):
        with pytest.raises(ValueError, match="--hard-tasks .*ChooseCat,LogicalObj"):
            train_toy.parse_tasks(bad, "--hard-tasks", HARD_TASKS)
    args = train_toy.build_parser().parse_args(["--extra-questions", "1", "--extra-question-tasks", "LogicalObj"])
    assert train_toy.train_config_from_args(args).extra_question_tasks == ("LogicalObj",)
    with pytest.raises(SystemExit):  # unknown task: the parser's error, before any training starts
        train_toy.main(["--extra-question-tasks", "ChooseColour", "--out", "unused"])


def test_task_weights_from_the_command_line():
    assert parse_task_weights("ChooseRel=3, LogicalObj=3,ChooseCat=1") == (
        ("ChooseRel", 3),
        ("LogicalObj", 3),
        ("ChooseCat", 1),
    )
    with pytest.raises(ValueError, match="TASK=INTEGER"):
        parse_task_weights("ChooseRel=3,LogicalObj")
    with pytest.raises(SystemExit):  # unknown task: the parser's error, before any training starts
        train_toy.main(["--task-weights", "ChooseColour=1", "--out", "unused"])


def test_the_model_card_names_the_command_that_reproduces_the_run():
    assert train_toy.command_line(TrainConfig().to_dict(), seed=3) == "python -m flowlib.train_toy --seed 3"
    changed = dataclasses.replace(
        TrainConfig(),
        steps=1234,
        lr=1e-3,
        vision_pretrain_steps=0,
        hard_negatives=0.25,
        hard_tasks=("ChooseCat",),
        verify_queries=1,
        named_queries=2,
        extra_question_tasks=("ChooseRel", "LogicalObj"),
        task_weights=(("ChooseRel", 1), ("LogicalObj", 2)),
    )
    as_stored = json.loads(json.dumps(changed.to_dict()))  # card.json holds lists where the config has tuples
    command = train_toy.command_line(as_stored, seed=5)
    assert "--task-weights ChooseRel=1,LogicalObj=2" in command and "--steps 1234" in command
    assert "--hard-negatives 0.25 --hard-tasks ChooseCat" in command
    assert "--extra-question-tasks ChooseRel,LogicalObj" in command
    assert "--verify-queries 1 --named-queries 2" in command
    program, argv = "python -m flowlib.train_toy ", command.split(" ")
    assert command.startswith(program)
    args = train_toy.build_parser().parse_args(argv[3:])
    assert args.seed == 5 and train_toy.train_config_from_args(args) == changed
    # A setting no flag reaches: the Python call, which rebuilds the same config.
    changed = dataclasses.replace(changed, batch_size=8, distractor_curriculum=((10, 0),))
    call = train_toy.command_line(json.loads(json.dumps(changed.to_dict())), seed=5)
    prefix, suffix = "flowlib.train_toy.train(ToyConfig(), ", ", seed=5)"
    assert call.startswith(prefix) and call.endswith(suffix)
    config_expression = call.removeprefix(prefix).removesuffix(suffix)
    assert eval(config_expression, {"TrainConfig": TrainConfig}) == changed


def test_the_model_card_renders_from_its_json_and_names_the_hard_tasks():
    from flowlib import config as cfg

    folder = cfg.SHORT_NAMES[cfg.OFFLINE_MODEL]
    card = json.loads((folder / "card.json").read_text())
    assert train_toy.model_card_markdown(card) == (folder / "MODEL_CARD.md").read_text()  # committed in step
    card["train_config"].update(hard_negatives=0.5, hard_tasks=["ChooseCat"])
    text = train_toy.model_card_markdown(card)
    assert "50% of ChooseCat training samples hard (ChooseCat's false shape always in the scene;" in text
    assert "LogicalObj `no` scenes" not in text
    card["train_config"]["hard_tasks"] = ["ChooseCat", "LogicalObj"]
    assert "LogicalObj `no` scenes" in train_toy.model_card_markdown(card)
    # bit-identity on the same processor was measured on CPUs only, so a GPU run's card does not claim it
    assert "Deterministic from the seed on the same processor" in train_toy.model_card_markdown(card)
    card["training"]["device"] = "NVIDIA H200, data on 6 CPU worker process(es)"
    assert "Deterministic" not in train_toy.model_card_markdown(card)
