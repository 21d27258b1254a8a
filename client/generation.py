"""Text in, text out: a prompt through the model's tokenizer, tokens from
`lmps.core.generation`, the continuation handed out as it comes (`lmps generate` streams it
to the terminal), cut at the first stop string, with the speed it ran at.

Stop strings are matched on the decoded text, not on tokens: a stop string can end in the
middle of a token or span several. So the stream holds back any tail of the text that could
still become a stop string (and a tail that is half a UTF-8 character, which the byte-level
tokenizer decodes as U+FFFD), and hands it out once the next tokens rule that out. The stop
string itself, and whatever its last token decoded to after it, are never handed out.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tokenizers import Tokenizer

from lmps.core.data import EOT
from lmps.core.generation import SamplingSettings, cached_steps, generate_tokens
from lmps.core.model import GPT

REPLACEMENT = "\ufffd"  # what a partial UTF-8 sequence decodes to


def held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that starts some stop string without being all
    of it: the part that must wait for more tokens before it may be shown."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


@dataclass
class TextStream:
    """The continuation's text, decoded token by token, released as far as it is final."""

    tokenizer: Tokenizer
    stops: tuple[str, ...] = ()
    ids: list[int] = field(default_factory=list)
    released: int = 0
    """Characters of the text handed out so far."""
    stopped_by: str | None = None
    """The stop string found, once one is."""

    def push(self, token: int) -> str:
        """Add a token; returns the text it makes final (maybe ''). After a stop string is
        found (`stopped_by`) the text up to it is out and nothing more comes."""
        self.ids.append(token)
        text: str = self.tokenizer.decode(self.ids)
        # A stop string lies within what is not out yet, or straddles its start.
        start = max(0, self.released - max((len(s) for s in self.stops), default=0))
        found = [(text.find(s, start), s) for s in self.stops if s and s in text[start:]]
        if found:
            end, self.stopped_by = min(found)
            return self._release(text, end)
        end = len(text) - held_back(text, self.stops)
        while end > self.released and text[end - 1] == REPLACEMENT:
            end -= 1
        return self._release(text, end)

    def flush(self) -> str:
        """What was held back, at the end (no more tokens will come)."""
        if self.stopped_by is not None:
            return ""
        text: str = self.tokenizer.decode(self.ids)
        return self._release(text, len(text))

    def _release(self, text: str, end: int) -> str:
        # Decoding more tokens never rewrites text already final, so text[released:end] is
        # the new part (end < released only when a stop string started inside held text).
        out = text[self.released : end] if end > self.released else ""
        self.released = max(self.released, end)
        return out


@dataclass(frozen=True)
class Generation:
    """One continuation and how it was made."""

    text: str
    """The new text, without the prompt, cut before the stop string."""
    tokens: int
    """New tokens generated (the stop string's last one included)."""
    seconds: float
    """Wall time of the decoding loop, the prompt's forward included."""
    first_token_s: float
    """Wall time until the first new token (the prompt's forward)."""
    stopped_by: str | None
    """The stop string that ended it, EOT if the end-of-text token did, None if it ran to
    max_new_tokens."""
    cached_steps: int
    """Steps that fed the model only their new token (0 without the cache)."""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def prompt_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """The prompt's token ids; an empty prompt is the end-of-text token, the start of any
    document in the training data (id 0 if the tokenizer has none)."""
    ids: list[int] = tokenizer.encode(prompt).ids
    return ids or [tokenizer.token_to_id(EOT) or 0]


def generate_text(
    model: GPT,
    tokenizer: Tokenizer | None,
    prompt: str | Sequence[int],
    settings: SamplingSettings,
    *,
    stops: Sequence[str] = (),
    stop_at_eot: bool = False,
    on_text: Callable[[str], None] | None = None,
) -> Generation:
    """Continue `prompt` with `model` (on whatever device it is). `on_text` gets
    each piece of the continuation as soon as it is final (streaming); the pieces add up to
    `Generation.text`. Stops at max_new_tokens, the first of `stops` in the text, or (with
    `stop_at_eot`) the end-of-text token. `prompt` may also be token ids already encoded
    (a chat template's, `lmps chat`)."""
    if tokenizer is None:
        raise ValueError("this model has no tokenizer to encode the prompt with")
    ids = prompt_ids(tokenizer, prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
    device = next(model.parameters()).device
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    eot = tokenizer.token_to_id(EOT) if stop_at_eot else None
    stream = TextStream(tokenizer, tuple(s for s in stops if s))
    pieces: list[str] = []

    def emit(piece: str) -> None:
        if piece:
            pieces.append(piece)
            if on_text is not None:
                on_text(piece)

    count, first_token_s, stopped_by = 0, 0.0, None
    started = time.perf_counter()
    with contextlib.closing(generate_tokens(model, idx, settings)) as tokens:
        for token in tokens:
            count += 1
            if count == 1:
                first_token_s = time.perf_counter() - started
            value = int(token[0])
            if value == eot:
                stopped_by = EOT
                break
            emit(stream.push(value))
            if stream.stopped_by is not None:
                stopped_by = stream.stopped_by
                break
    seconds = time.perf_counter() - started
    emit(stream.flush())
    used = cached_steps(len(ids), count, model.config.block_size) if settings.use_cache else 0
    return Generation("".join(pieces), count, seconds, first_token_s, stopped_by, used)


FLAGS = {
    "max_new_tokens": "--max-new-tokens",
    "temperature": "--temperature",
    "top_k": "--top-k",
    "top_p": "--top-p",
    "repetition_penalty": "--repetition-penalty",
    "seed": "--seed",
}
"""SamplingSettings field -> the `lmps generate` flag that sets it."""


def sampling_settings(args: argparse.Namespace) -> SamplingSettings:
    """The settings of `lmps generate`'s flags; a bad value is a ValueError naming its flag."""
    if args.top_k < 0:
        raise ValueError(f"--top-k must be >= 0 (0 = off), got {args.top_k}")
    try:
        return SamplingSettings(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k or None,
            top_p=args.top_p,
            repetition_penalty=args.repetition_penalty,
            seed=args.seed,
            use_cache=not args.no_cache,
        )
    except ValueError as err:
        message = str(err)
        name = message.split(" ", 1)[0]
        if name in FLAGS:
            message = FLAGS[name] + message[len(name) :]
        raise ValueError(message) from None


def unescape(text: str) -> str:
    """A stop string as typed in a shell: `\\n` is a newline, `\\t` a tab, `\\\\` a backslash."""
    out, i = [], 0
    while i < len(text):
        pair = text[i : i + 2]
        if pair in ("\\n", "\\t", "\\\\"):
            out.append({"\\n": "\n", "\\t": "\t", "\\\\": "\\"}[pair])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)
