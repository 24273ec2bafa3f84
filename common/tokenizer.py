"""Tokenizer and chat template of a model, from GGUF metadata or tokenizer.json. torch-free.

The GGUF case builds a byte-level BPE `tokenizers.Tokenizer` from the vocabulary and merges
stored in the file, with the pre-tokenizer llama.cpp names in `tokenizer.ggml.pre`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from common.errors import InvalidRequestError, ModelLoadError
from common.model.gguf_meta import gguf_field
from common.model_source import ModelSource, open_gguf

# GPT-2's split pattern; llama.cpp's "smollm"/"gpt2" pre-types use it (smollm also splits digits).
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CONTROL = 3  # llama.cpp token type of control (special) tokens
_USER_DEFINED = 4


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


class Tokenizer:
    def __init__(
        self,
        tok: HFTokenizer,
        chat_template: str | None,
        eos_token_ids: Sequence[int],
        bos_token: str | None = None,
        add_bos: bool = False,
    ) -> None:
        self._tok = tok
        self._template_src = chat_template
        self._template = _jinja_env().from_string(chat_template) if chat_template else None
        self.eos_token_ids = tuple(eos_token_ids)
        self.bos_token = bos_token
        self.add_bos = add_bos
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        # Message content is text: a control token's spelling in it (a forged "<|im_start|>system")
        # must be encoded as the characters it is made of, so content goes through a copy that
        # does not parse special tokens. Only the template's own markup yields control tokens.
        self._specials = tuple(t.content for t in tok.get_added_tokens_decoder().values() if t.special)
        self._as_text = HFTokenizer.from_str(tok.to_str())
        self._as_text.encode_special_tokens = True

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_source(cls, source: ModelSource) -> Tokenizer:
        return cls.from_gguf(source.path) if source.kind == "gguf" else cls.from_dir(source.path)

    @classmethod
    def from_gguf(cls, path: Path) -> Tokenizer:
        reader = open_gguf(path)

        def field(key: str, default: Any = None) -> Any:
            return gguf_field(reader, key, default)

        kind = field("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ModelLoadError(f"GGUF tokenizer model {kind!r} is not supported (byte-level BPE 'gpt2' is)")
        tokens: list[str] = field("tokenizer.ggml.tokens")
        types: list[int] = field("tokenizer.ggml.token_type", [1] * len(tokens))
        merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges", [])]
        pre = field("tokenizer.ggml.pre", "gpt2")
        tok = HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
        split = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        pattern = _LLAMA3_SPLIT if pre in ("llama3", "llama-bpe", "qwen2") else _GPT2_SPLIT
        steps = [pre_tokenizers.Split(Regex(pattern), behavior="isolated"), split]
        if pre == "smollm":
            steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
        tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(
            [
                AddedToken(t, special=True, normalized=False)
                for t, ty in zip(tokens, types, strict=True)
                if ty in (_CONTROL, _USER_DEFINED)
            ]
        )
        eos = field("tokenizer.ggml.eos_token_id")
        eot = field("tokenizer.ggml.eot_token_id")
        eos_ids = [i for i in (eos, eot) if i is not None]
        bos = field("tokenizer.ggml.bos_token_id")
        return cls(
            tok,
            field("tokenizer.chat_template"),
            eos_ids,
            bos_token=tokens[bos] if bos is not None else None,
            add_bos=bool(field("tokenizer.ggml.add_bos_token", False)),
        )

    @classmethod
    def from_dir(cls, path: Path) -> Tokenizer:
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise ModelLoadError(f"{path} has no tokenizer.json")
        tok = HFTokenizer.from_file(str(tj))
        cfg_path = path / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        eos_ids: list[int] = []
        model_cfg = json.loads((path / "config.json").read_text())
        eos = model_cfg.get("eos_token_id")
        eos_ids += eos if isinstance(eos, list) else ([eos] if eos is not None else [])
        for key in ("eos_token",):
            val = cfg.get(key)
            name = val.get("content") if isinstance(val, dict) else val
            if name and (tid := tok.token_to_id(name)) is not None and tid not in eos_ids:
                eos_ids.append(tid)
        bos = cfg.get("bos_token")
        bos = bos.get("content") if isinstance(bos, dict) else bos
        return cls(tok, cfg.get("chat_template"), eos_ids, bos_token=bos, add_bos=bool(cfg.get("add_bos_token")))

    # -- use ------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if self.add_bos and self.bos_token is not None:
            bos_id = self._tok.token_to_id(self.bos_token)
            if not ids or ids[0] != bos_id:
                ids = [bos_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def render_chat(self, messages: Sequence[ChatMessage | dict[str, str]], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            raise InvalidRequestError("this model has no chat template; use /v1/completions", "messages")
        msgs = [m if isinstance(m, dict) else {"role": m.role, "content": m.content} for m in messages]
        return self._template.render(
            messages=msgs, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token or ""
        )

    def encode_chat(self, messages: Sequence[ChatMessage | dict[str, str]]) -> list[int]:
        msgs = [m if isinstance(m, dict) else {"role": m.role, "content": m.content} for m in messages]
        if not any(sp in m["content"] for m in msgs for sp in self._specials):
            return self._tok.encode(self.render_chat(msgs), add_special_tokens=False).ids
        # Render with a placeholder per message (NUL is refused in requests, so none can collide),
        # then encode the template's pieces with control tokens and the contents as plain text.
        marks = [f"\x00{i}\x00" for i in range(len(msgs))]
        rendered = self.render_chat([{**m, "content": mark} for m, mark in zip(msgs, marks, strict=True)])
        ids: list[int] = []
        for i, piece in enumerate(rendered.split("\x00")):
            if i % 2 == 0:
                ids += self._tok.encode(piece, add_special_tokens=False).ids if piece else []
            else:
                ids += self._as_text.encode(msgs[int(piece)]["content"], add_special_tokens=False).ids
        return ids


def _jinja_env() -> ImmutableSandboxedEnvironment:
    def raise_exception(message: str) -> None:
        raise InvalidRequestError(f"chat template rejected the messages: {message}", "messages")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env
