"""Tokenizers of a checkpoint: the default byte-level one, or a user's Hugging Face ``tokenizer.json``.

The default maps byte b to token id b (0..255) and adds two special tokens,
``<|endoftext|>`` (256, end of document) and ``<|pad|>`` (257). It needs no
download and no training, and it is saved as a Hugging Face ``tokenizer.json``
(a byte-level BPE without merges) plus ``tokenizer_config.json``, so mlx-lm and
transformers load it unchanged.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
END_OF_TEXT = "<|endoftext|>"
PAD = "<|pad|>"
#: chat template of the byte tokenizer (tokenizer_config.json "chat_template", read by mlx_lm.chat and the
#: server's /v1/chat/completions): a plain transcript, one "role: content" line per message, then "assistant:".
#: It only formats the conversation; a model answers sensibly only if it was trained on such transcripts.
BYTE_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


#: a template is a few KB; a larger file is not one (e.g. a tokenizer.json passed by mistake)
MAX_CHAT_TEMPLATE_BYTES = 1 << 20
_SAMPLE_CONVERSATION = [
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3 + 3?"},
]


def load_chat_template(path, special_tokens: dict | None = None) -> str:
    """A Jinja chat template read from ``path`` and checked the way mlx-lm and transformers will run it: it
    compiles in a sandboxed environment and renders a sample conversation that it does not drop."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"chat template {path} not found (expected a Jinja template file)")
    if path.stat().st_size > MAX_CHAT_TEMPLATE_BYTES:
        raise ValueError(f"{path} is {path.stat().st_size:,} bytes: not a chat template "
                         f"(expected a Jinja template of at most {MAX_CHAT_TEMPLATE_BYTES:,} bytes)")
    try:
        template = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}): expected a Jinja chat template") from None
    _check_renders(template, _SAMPLE_CONVERSATION, special_tokens or {}, source=str(path))
    return template


def _check_renders(template: str, messages: list[dict], special_tokens: dict, source: str):
    """``template`` applied to ``messages`` as transformers' ``apply_chat_template`` does (sandboxed Jinja, blocks
    trimmed, ``raise_exception`` defined) writes every message's content; errors name ``source`` and the line."""
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ImportError("chat templates need jinja2 (pip install jinja2)") from None

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        text = env.from_string(template).render(messages=messages, add_generation_prompt=True,
                                                **{k: v or "" for k, v in special_tokens.items()})
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"{source}: line {e.lineno}: {e.message} (not a valid Jinja chat template)") from None
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"{source} fails on a sample conversation (user, assistant, user): {e}") from None
    missing = [m["content"] for m in messages if m["content"] not in text]
    if missing:
        raise ValueError(f"{source} leaves the messages' content out of what it renders (no {missing[0]!r}): "
                         f"a chat template must write each message's content")


@lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """The printable-character alphabet of byte-level BPE (bytes -> visible unicode characters),
    the mapping Hugging Face's ByteLevel pre-tokenizer and decoder use."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _build_byte_tokenizer():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {_byte_to_unicode()[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(END_OF_TEXT, special=True), AddedToken(PAD, special=True)])
    return tok


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` plus what the model and the checkpoint need from it."""

    def __init__(self, tokenizer, config: dict, is_bytes: bool = False):
        self.tokenizer = tokenizer
        self.config = config
        self.is_bytes = is_bytes
        eos = config.get("eos_token")
        self.eos_token_id = tokenizer.token_to_id(eos) if eos else None

    # -- construction ----------------------------------------------------------------
    @classmethod
    def bytes(cls) -> TextTokenizer:
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": END_OF_TEXT,
            "pad_token": PAD,
            "bos_token": None,
            "unk_token": None,
            "add_bos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1 << 30,
            "chat_template": BYTE_CHAT_TEMPLATE,
        }
        return cls(_build_byte_tokenizer(), config, is_bytes=True)

    @classmethod
    def from_file(cls, path) -> TextTokenizer:
        """A Hugging Face ``tokenizer.json``; a ``tokenizer_config.json`` next to it is kept."""
        from tokenizers import Tokenizer

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} not found (expected a Hugging Face tokenizer.json)")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:
            raise ValueError(f"{path} is not a valid Hugging Face tokenizer.json: {e}") from None
        config_path = path.with_name(TOKENIZER_CONFIG_FILE)
        config = {"tokenizer_class": "PreTrainedTokenizerFast"}
        if config_path.is_file():
            config = json.loads(config_path.read_text())
        if not config.get("eos_token") and tok.token_to_id(END_OF_TEXT) is not None:
            config["eos_token"] = END_OF_TEXT
        is_bytes = json.loads(tok.to_str()) == json.loads(_build_byte_tokenizer().to_str())
        return cls(tok, config, is_bytes=is_bytes)

    @classmethod
    def from_folder(cls, folder) -> TextTokenizer:
        path = Path(folder) / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: the checkpoint folder has no tokenizer (expected {TOKENIZER_FILE} "
                f"and {TOKENIZER_CONFIG_FILE})"
            )
        return cls.from_file(path)

    def with_chat_template(self, template: str) -> TextTokenizer:
        """This tokenizer, saved with ``template`` as its ``tokenizer_config.json`` chat template."""
        return TextTokenizer(self.tokenizer, {**self.config, "chat_template": template}, is_bytes=self.is_bytes)

    def special_tokens(self) -> dict[str, str | None]:
        """The special tokens a chat template may refer to by name."""
        return {name: self.config.get(name) for name in ("bos_token", "eos_token", "pad_token", "unk_token")}

    # -- use ------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        if self.is_bytes:  # same ids as the tokenizer.json, without its per-character overhead
            return list(text.encode("utf-8"))
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        if self.is_bytes:
            return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
        return self.tokenizer.decode(list(ids))

    def files(self) -> dict[str, bytes]:
        """The files this tokenizer is saved as in a checkpoint folder."""
        return {
            TOKENIZER_FILE: self.tokenizer.to_str().encode(),
            TOKENIZER_CONFIG_FILE: json.dumps(self.config, indent=2).encode(),
        }
