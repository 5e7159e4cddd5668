"""The training stream: chunk k of a run, encoded as token ids and pixels, made inline or by worker processes.

Chunk k is `generate_rows(recipe.task_counts(), seed=chunk_seed(seed, k), split="train")` with the
recipe's hard share and the curriculum's distractor cap, shuffled by (seed, k): a pure function of the
recipe, the seed and k (pinned by a test), so a worker process may generate chunks ahead, which changes
timing only. Each sample is one conversation about its image: the evaluation prompt and its answer,
`named_query` turns, and a last turn describing the scene (`flowlib.toy.turns`).
"""

from __future__ import annotations

import itertools
import json
import multiprocessing as mp
import os
from queue import Full

import numpy as np
import torch

from ..data.synthetic import generate_rows
from ..models import build_prompt
from .model import ToyConfig, answer_target, build_toy_model
from .patches import patch_labels
from .recipe import TrainConfig, chunk_seed
from .turns import DESCRIBE_REQUEST, describe_scene, named_query


def _draw(per_task, seed: int, k: int, max_distractors: int | None = None, hard: float = 0.0):
    """Chunk k's rows in training order and their scene graphs."""
    # Rows with in-memory images, not generate_split's Dataset: the same pixels without a PNG round trip.
    rows = generate_rows(per_task, seed=chunk_seed(seed, k), split="train", max_distractors=max_distractors, hard=hard)
    rows = [rows[int(i)] for i in np.random.default_rng([seed, k]).permutation(len(rows))]
    return rows, [json.loads(row["scene_graph"]) for row in rows]


def encode_chunk(processor, model_config: ToyConfig, recipe: TrainConfig, seed: int, k: int) -> dict:
    """Chunk k of the training stream as token id lists and pixel values.

    A sample's ids are the prompt, the answer and `</s>` (exactly what the model sees at evaluation),
    then `recipe.named_queries` turns `USER: which of a <shape> or a <shape> is <value> ? ASSISTANT:
    <Shapes or No> </s>`, then `USER: what is in the image ? ASSISTANT: <describe_scene> </s>`: the
    description comes last so that no question can read its answer from it. `answers` holds each
    sample's (start, end) spans of the answer tokens, `queries` those of the named queries' answers,
    `descriptions` the description's span and `questions` the first question's words.
    """
    caps = recipe.distractor_caps()
    samples, scenes = _draw(
        recipe.task_counts(), seed, k, max_distractors=caps[k] if k < len(caps) else None, hard=recipe.hard_negatives
    )
    # One draw stream per purpose, so that each turn's draws do not depend on the others'.
    describe_rng = np.random.default_rng([seed, k, 1])
    named_rng = np.random.default_rng([seed, k, 5])
    tokenizer = processor.tokenizer
    request = tokenizer(f"USER: {DESCRIBE_REQUEST} ASSISTANT:", add_special_tokens=False)["input_ids"]
    # One processor call for the chunk: called per sample, its overhead takes a fifth of a chunk's time.
    encoded = processor(
        images=[sample["image"] for sample in samples], text=[build_prompt(s["question"])[0] for s in samples]
    )
    ids, questions, answers, queries, descriptions = [], [], [], [], []
    for sample, scene, prompt_ids in zip(samples, scenes, encoded["input_ids"]):
        prompt_ids = list(prompt_ids)
        row = prompt_ids + [_answer_id(tokenizer, sample["answer"]), tokenizer.eos_token_id]
        answers.append(((len(prompt_ids), len(row)),))
        spans = []
        for _ in range(recipe.named_queries):
            question, answer = named_query(scene, named_rng)
            row += tokenizer(f"USER: {question} ASSISTANT:", add_special_tokens=False)["input_ids"]
            start = len(row)
            row += tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            spans.append((start, len(row)))
        queries.append(tuple(spans))
        row += request
        start = len(row)
        row += tokenizer(describe_scene(scene, describe_rng), add_special_tokens=False)["input_ids"]
        row += [tokenizer.eos_token_id]
        descriptions.append((start, len(row)))
        ids.append(row)
        questions.append(_find_last(prompt_ids, tokenizer(sample["question"], add_special_tokens=False)["input_ids"]))
    return {
        "ids": ids,
        "pixel_values": torch.as_tensor(np.stack(encoded["pixel_values"])),
        "tasks": [sample["task"] for sample in samples],
        "patch_labels": torch.stack([patch_labels(scene, model_config) for scene in scenes]),
        "questions": questions,
        "answers": answers,
        "queries": queries,
        "descriptions": descriptions,
    }


def encode_images(processor, model_config: ToyConfig, per_task: int, seed: int, k: int) -> dict:
    """Chunk k's full scenes as pixel values and patch labels only (`per_task` of each task, none hard)."""
    samples, scenes = _draw(per_task, seed, k)
    encoded = processor.image_processor([sample["image"] for sample in samples])
    return {
        "pixel_values": torch.as_tensor(np.stack(encoded["pixel_values"])),
        "patch_labels": torch.stack([patch_labels(scene, model_config) for scene in scenes]),
    }


def _answer_id(tokenizer, answer: str) -> int:
    answer_id = tokenizer.convert_tokens_to_ids(answer_target(answer))
    if answer_id == tokenizer.unk_token_id:
        raise ValueError(f"answer {answer!r} is not in the toy vocabulary")
    return answer_id


def _find_last(ids: list[int], part: list[int]) -> tuple[int, int]:
    """(start, end) of the last occurrence of `part` in `ids`."""
    for start in range(len(ids) - len(part), -1, -1):
        if ids[start : start + len(part)] == part:
            return start, start + len(part)
    raise ValueError("the question's tokens are not in the prompt")


def _producer(queue, model_config: ToyConfig, recipe: TrainConfig, seed: int, start: int, stride: int):
    """Put chunks start, start + stride, ... into `queue` (a worker process of `ChunkStream`).

    Runs until the trainer is gone: a trainer killed without cleanup (SIGKILL, SIGTERM) would
    otherwise leave its workers waiting on a full queue forever.
    """
    torch.set_num_threads(1)
    trainer = os.getppid()
    processor = build_toy_model(model_config, seed=0).processor
    for k in itertools.count(start, stride):
        try:
            chunk = encode_chunk(processor, model_config, recipe, seed, k)
        except Exception as error:  # sent on, so that the trainer fails now, not after a 10-minute wait
            chunk = RuntimeError(f"data worker failed on chunk {k}: {error!r}")
        while True:
            try:
                queue.put((k, chunk), timeout=5)
                break
            except Full:
                if os.getppid() != trainer:
                    return
        if isinstance(chunk, Exception):  # the trainer raises it; nothing after it will be read
            return


class ChunkStream:
    """Chunks 0, 1, 2, ... in order, generated inline (workers=0) or ahead by worker processes.

    Worker w of n makes chunks w, w + n, ... and they are read back in turn, so the stream is the
    same for any number of workers (one keeps up with 2 CPU cores; a GPU needs several). A resumed run
    starts the stream at `first_chunk` instead of 0.
    """

    def __init__(
        self,
        processor,
        model_config: ToyConfig,
        recipe: TrainConfig,
        seed: int,
        workers: int = 1,
        first_chunk: int = 0,
    ):
        self.processor, self.model_config, self.recipe, self.seed = processor, model_config, recipe, seed
        self.first_chunk = self.k = first_chunk
        self.queues, self.processes = [], []
        ctx = mp.get_context("spawn")
        for w in range(workers):
            self.queues.append(ctx.Queue(maxsize=3))
            args = (self.queues[-1], model_config, recipe, seed, first_chunk + w, workers)
            self.processes.append(ctx.Process(target=_producer, daemon=True, args=args))
            self.processes[-1].start()

    def next(self) -> dict:
        if not self.processes:
            chunk = encode_chunk(self.processor, self.model_config, self.recipe, self.seed, self.k)
        else:
            k, chunk = self.queues[(self.k - self.first_chunk) % len(self.queues)].get(timeout=600)
            if isinstance(chunk, Exception):
                raise chunk
            assert k == self.k, (k, self.k)
        self.k += 1
        return chunk

    def close(self):
        for process in self.processes:
            process.terminate()
            process.join(5)


def batches(stream: ChunkStream, pad_id: int, skip: int = 0):
    """Yield right-padded batches of the recipe's size, leaving out the first chunk's first `skip` (a resumed run).

    `labels` mark the answer word and its `</s>`; `question_labels` the question's words, whose
    prediction is an auxiliary loss (many of them can only be guessed from the image: which shapes and
    colours a scene holds); `query_labels` the named queries' answers and their `</s>`;
    `describe_labels` the scene description of the last turn and its `</s>`.
    """
    batch_size = stream.recipe.batch_size
    while True:
        chunk = stream.next()
        for start in range(skip * batch_size, len(chunk["ids"]) - batch_size + 1, batch_size):
            rows = chunk["ids"][start : start + batch_size]
            length = max(len(r) for r in rows)
            input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
            attention_mask = torch.zeros_like(input_ids)
            targets = {name: torch.full_like(input_ids, -100) for name in LABELS}
            for i, r in enumerate(rows):
                input_ids[i, : len(r)] = torch.tensor(r)
                attention_mask[i, : len(r)] = 1
                spans = [("labels", span) for span in chunk["answers"][start + i]]
                spans += [("query_labels", span) for span in chunk["queries"][start + i]]
                spans += [
                    ("question_labels", chunk["questions"][start + i]),
                    ("describe_labels", chunk["descriptions"][start + i]),
                ]
                for name, (span_start, span_end) in spans:
                    targets[name][i, span_start:span_end] = input_ids[i, span_start:span_end]
            yield {
                "input_ids": input_ids,
                "attention_mask": attention_mask,
                **targets,
                "pixel_values": chunk["pixel_values"][start : start + batch_size],
                "patch_labels": chunk["patch_labels"][start : start + batch_size],
            }
        skip = 0


#: The token-label tensors of a batch, one per loss on the decoder's predictions.
LABELS = ("labels", "question_labels", "query_labels", "describe_labels")
