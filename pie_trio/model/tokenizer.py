"""Tokenizer and chat template, built from GGUF metadata or a Hugging Face `tokenizer.json`.

The heavy lifting is the `tokenizers` library; this module only assembles it from what the model
file says, renders the model's own chat template with jinja2 (as transformers does), and knows
which tokens end a generation.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as Backend

# Tokens that end a turn or a text in the common chat formats; any of them present in a
# vocabulary as a special token is a stop token, besides the model's declared EOS.
END_MARKERS = (
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|end|>",
    "<end_of_turn>",
    "</s>",
)

# How llama.cpp's `tokenizer.ggml.pre` names split text before byte-level BPE. SmolLM isolates
# every digit, then applies the GPT-2 rules; Llama 3 and Qwen2 use one regex each.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_BY_PRE = {
    "llama3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
}
_DIGIT_SPLITTING_PRE = ("smollm", "starcoder", "refact")

# llama.cpp token types.
_CONTROL = 3
_USER_DEFINED = 4


def _byte_decoder() -> dict[str, int]:
    """GPT-2's reversible map from printable characters back to raw bytes."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre in _SPLIT_BY_PRE:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT_BY_PRE[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLITTING_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level


class Tokenizer:
    """Text ↔ token ids for one model, plus its chat template and stop tokens."""

    def __init__(
        self,
        backend: Backend,
        *,
        vocab_size: int,
        chat_template: str | None,
        bos_token_id: int | None,
        eos_token_id: int | None,
        extra_stop_ids: Iterable[int] = (),
    ) -> None:
        self.backend = backend
        self.vocab_size = max(vocab_size, backend.get_vocab_size(with_added_tokens=True))
        self.chat_template = chat_template
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.bos_token = backend.id_to_token(bos_token_id) if bos_token_id is not None else None
        self.eos_token = backend.id_to_token(eos_token_id) if eos_token_id is not None else None
        self.stop_tokens = self._find_stop_tokens(extra_stop_ids)

    def _find_stop_tokens(self, extra: Iterable[int]) -> list[int]:
        stops = set(extra)
        if self.eos_token_id is not None:
            stops.add(self.eos_token_id)
        special = {t.content for t in self.backend.get_added_tokens_decoder().values() if t.special}
        for marker in END_MARKERS:
            token_id = self.backend.token_to_id(marker)
            if token_id is not None and marker in special:
                stops.add(token_id)
        return sorted(stops)

    # -- text ----------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens written in the text are recognised, none added."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    def token_bytes(self) -> list[bytes]:
        """The raw bytes of every token id (b"" for ids the vocabulary leaves unused)."""
        return list(self._token_bytes)

    @cached_property
    def _token_bytes(self) -> tuple[bytes, ...]:
        decoder_type = json.loads(self.backend.to_str()).get("decoder", {}) or {}
        byte_level = decoder_type.get("type") == "ByteLevel" or any(
            d.get("type") == "ByteLevel" for d in decoder_type.get("decoders", ())
        )
        special = {i: t.content for i, t in self.backend.get_added_tokens_decoder().items()}
        table = _byte_decoder()
        out: list[bytes] = []
        for token_id in range(self.vocab_size):
            token = self.backend.id_to_token(token_id)
            if token is None:
                out.append(b"")
            elif token_id in special:
                out.append(special[token_id].encode())
            elif byte_level and all(c in table for c in token):
                out.append(bytes(table[c] for c in token))
            elif byte_level:  # spelled outside the byte alphabet: taken as plain text
                out.append(token.encode())
            else:
                out.append(_sentencepiece_bytes(token))
        return tuple(out)

    # -- chat ----------------------------------------------------------------------------------

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        **extra: Any,
    ) -> str:
        """The model's own chat template applied to `messages`, as transformers renders it."""
        if not self.chat_template:
            raise ValueError("this model has no chat template")
        return _compile_template(self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **extra,
        )

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], vocab_size: int) -> Tokenizer:
        """Rebuild a byte-level BPE tokenizer from llama.cpp's `tokenizer.*` metadata keys."""
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(
                f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2'); "
                "load the model from a Hugging Face directory with tokenizer.json instead"
            )
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        vocab = {token: i for i, token in enumerate(tokens)}
        backend = Backend(models.BPE(vocab=vocab, merges=merges))
        backend.pre_tokenizer = _byte_level_pre_tokenizer(meta.get("tokenizer.ggml.pre", ""))
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens(
            [
                AddedToken(t, special=True, normalized=False)
                for t, kind_ in zip(tokens, types, strict=True)
                if kind_ == _CONTROL
            ]
        )
        backend.add_tokens(
            [
                AddedToken(t, special=False, normalized=False)
                for t, kind_ in zip(tokens, types, strict=True)
                if kind_ == _USER_DEFINED
            ]
        )
        return cls(
            backend,
            vocab_size=vocab_size,
            chat_template=meta.get("tokenizer.chat_template"),
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        )

    @classmethod
    def from_hf_dir(cls, path: Path, vocab_size: int, hf_config: dict[str, Any]) -> Tokenizer:
        """Load `tokenizer.json` with its `tokenizer_config.json` and generation settings."""
        backend = Backend.from_file(str(path / "tokenizer.json"))
        tok_config = _read_json(path / "tokenizer_config.json")
        gen_config = _read_json(path / "generation_config.json")
        template = tok_config.get("chat_template")
        if (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text()
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)

        def token_id(name: str) -> int | None:
            token = tok_config.get(name)
            if isinstance(token, dict):
                token = token.get("content")
            found = backend.token_to_id(token) if token else None
            return found if found is not None else _first_id(hf_config.get(f"{name}_id"))

        eos_ids = gen_config.get("eos_token_id", hf_config.get("eos_token_id"))
        return cls(
            backend,
            vocab_size=vocab_size,
            chat_template=template,
            bos_token_id=token_id("bos_token"),
            eos_token_id=token_id("eos_token"),
            extra_stop_ids=_as_list(eos_ids),
        )


def _sentencepiece_bytes(token: str) -> bytes:
    """Bytes of a SentencePiece-style token: `▁` is a space, `<0xNN>` is one raw byte."""
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        return bytes([int(token[3:5], 16)])
    return token.replace("▁", " ").encode()


def _compile_template(source: str) -> jinja2.Template:
    # The same environment transformers uses, so templates render identically.
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_template_error
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, **kw: Any) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, **kw)


def _raise_template_error(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def _as_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def _first_id(value: int | list[int] | None) -> int | None:
    ids = _as_list(value)
    return ids[0] if ids else None
