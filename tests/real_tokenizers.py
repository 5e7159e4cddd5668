"""The paper's real tokenizers, built offline from ../shared/tokenizers as llava-hf ships them.

A helper for tests (not a test file): `vicuna_tokenizer` (LLaVA-1.5-7b/13b, LLaVA-v1.6-Vicuna-7b)
and `llama3_tokenizer` (Llama3-LLaVA-NeXT-8b). Each is built once per process and handed out as
a copy, so a test may change its copy freely. Both save and reload with
`save_pretrained` / `from_pretrained`.

Vicuna: the `'▁'` after `<image>` (the `legacy` setting)
    `legacy` decides whether the text after a special token gets SentencePiece's dummy-prefix
    `'▁'`. For the paper's `"USER: <image>\\nIs the ..."` it is the difference between
    `'▁', <image>..., '▁', '<0x0A>', 'Is'` (legacy) and `'▁', <image>..., '<0x0A>', 'Is'` (non-legacy);
    the `'▁'` before `<image>` is the space after `USER:` and is there either way.
    We build it with `legacy=True`, the legacy behaviour, because that is what llava-hf's
    tokenizer does:
    - transformers' own slow tests of llava-hf/llava-1.5-7b-hf decode `"USER: <image>\\nWhat ..."`
      to `"USER:  \\nWhat ..."` (two spaces: a `'▁'` on each side of the image) and
      `"<image>\\n<image>\\nUSER"` to `"\\n \\nUSER"`; the NeXT conversion script expects the same
      `"USER:  \\nWhat is shown in this image?"` of llava-v1.6-vicuna-7b.
    - llava-hf converted these tokenizers with transformers 4.36-4.39, whose Llama converter, as far as
      we can tell, always wrote the legacy pipeline (it honours `legacy=False` since pull request
      #28881, spring 2024): their tokenizer.json prepends `'▁'` to every piece of text between
      special tokens, whatever their tokenizer_config says.
    - transformers 5 loads the tokenizer of a `llava` / `llava_next` checkpoint as the generic
      `TokenizersBackend`, which runs tokenizer.json as saved (llava is in
      `MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS`); a plain `LlamaTokenizer` would instead rebuild the
      pipeline from `legacy`. Our `legacy=True` tokenizer gives the same ids both ways.
    - It is also how the original LLaVA (and the paper's code) tokenised: `tokenizer_image_token`
      encodes the text after `<image>` on its own, dummy prefix included.
    Not verified offline: the hub's tokenizer.json and tokenizer_config.json themselves (its
    `legacy` flag is most likely `false`, inherited from Vicuna, and has no effect as shown above).
    `<image>` = 32000 and `<pad>` = 32001 are added as special tokens (normalized=False), as the
    conversion scripts of llava-1.5 and of llava-v1.6-vicuna-7b did.

Llama-3: the 128,000 tiktoken ranks, converted with Llama-3's pre-tokenizer regex, then Llama 3's
256 special tokens in order, `<image>` = 128256 and `<pad>` = 128257 (the NeXT conversion script
adds both). bos `<|begin_of_text|>` is added by the post-processor as in Meta's tokenizer.json; eos is
`<|eot_id|>` (128009), the Instruct model's end of turn, which Meta's tokenizer_config used from
2024-05-10, before llava-hf converted the model. Not verified offline: llava-hf's own
tokenizer_config (eos, pad). `flowlib.models.stop_token_ids` adds 128009 whatever the eos is.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from tokenizers import AddedToken, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

#: sha256 of the two files, from ../shared/tokenizers/README.md.
SHA256 = {
    "llama-2/tokenizer.model": "9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347",
    "llama-3/tokenizer.model": "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55",
}
#: Llama-3's pre-tokenizer regex (Meta's llama3 tokenizer.py; transformers' TikTokenConverter default).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
#: Llama 3's 256 special tokens, ids 128000-128255 in this order.
LLAMA3_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    *(f"<|reserved_special_token_{i}|>" for i in range(4)),
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|reserved_special_token_4|>",
    "<|eot_id|>",
    *(f"<|reserved_special_token_{i}|>" for i in range(5, 251)),
)


class TokenizerFileError(RuntimeError):
    """A shared tokenizer file is missing or is not the upstream file."""


def tokenizer_file(shared_dir, relative: str) -> Path:
    """`shared_dir/tokenizers/relative`, checked against its sha256 from the README."""
    path = Path(shared_dir) / "tokenizers" / relative
    if not path.is_file():
        raise TokenizerFileError(f"{path} is missing")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SHA256[relative]:
        raise TokenizerFileError(f"{path} has sha256 {digest}, not the upstream {SHA256[relative]}")
    return path


def _special(content: str) -> AddedToken:
    # normalized=False: matched in the raw text, before any prefix or byte mapping.
    return AddedToken(content, special=True, normalized=False)


@functools.cache
def _build_vicuna(model_path: str):
    with tempfile.TemporaryDirectory() as folder:
        shutil.copy(model_path, Path(folder) / "tokenizer.model")
        (Path(folder) / "tokenizer_config.json").write_text(
            json.dumps(
                {
                    "tokenizer_class": "LlamaTokenizer",
                    "bos_token": "<s>",
                    "eos_token": "</s>",
                    "unk_token": "<unk>",
                    "add_bos_token": True,
                    "add_eos_token": False,
                    "legacy": True,  # legacy: see the module docstring
                    "clean_up_tokenization_spaces": False,
                    "padding_side": "left",
                }
            )
        )
        tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens([_special("<image>")], special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": _special("<pad>")})
    # transformers 5 keeps `legacy` out of init_kwargs, so save_pretrained would drop it and a reload as
    # LlamaTokenizer would rebuild the non-legacy pipeline; record it so that it is saved.
    tokenizer.init_kwargs["legacy"] = True
    assert tokenizer.convert_tokens_to_ids(["<image>", "<pad>"]) == [32000, 32001]
    return tokenizer


def vicuna_tokenizer(shared_dir):
    """The Llama-2 / Vicuna tokenizer as llava-hf/llava-1.5-7b-hf carries it (a fresh copy)."""
    return copy.deepcopy(_build_vicuna(str(tokenizer_file(shared_dir, "llama-2/tokenizer.model"))))


@functools.cache
def _build_llama3(model_path: str):
    backend = TikTokenConverter(model_path, pattern=LLAMA3_PATTERN).converted()
    base = backend.get_vocab_size()
    backend.add_special_tokens([_special(t) for t in LLAMA3_SPECIAL_TOKENS])
    backend.add_special_tokens([_special("<image>"), _special("<pad>")])
    bos = LLAMA3_SPECIAL_TOKENS[0]
    # As Meta's tokenizer.json: byte-level offsets, then <|begin_of_text|> in front.
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, base)]
            ),
        ]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token="<|eot_id|>",
        pad_token="<pad>",
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
    )
    assert tokenizer.convert_tokens_to_ids([bos, "<|eot_id|>", "<image>", "<pad>"]) == [128000, 128009, 128256, 128257]
    return tokenizer


def llama3_tokenizer(shared_dir):
    """The Llama-3 tokenizer as llava-hf/llama3-llava-next-8b-hf carries it (a fresh copy)."""
    return copy.deepcopy(_build_llama3(str(tokenizer_file(shared_dir, "llama-3/tokenizer.model"))))


def tokenizer_for(kind: str, shared_dir):
    """`vicuna_tokenizer` for "llama-2", `llama3_tokenizer` for "llama-3" (an `Architecture.tokenizer`)."""
    builders = {"llama-2": vicuna_tokenizer, "llama-3": llama3_tokenizer}
    if kind not in builders:
        raise KeyError(f"unknown tokenizer {kind!r}; use one of {', '.join(builders)}")
    return builders[kind](shared_dir)
