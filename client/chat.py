"""`lmps chat`: a conversation with a `--task sft` model, in the chat template it was tuned
on (`lmps.core.task_data`: role markers, the assistant's turn ending with `<|endoftext|>`).

Each turn renders the system message and the conversation so far, adds the generation
prompt (the assistant's marker), and streams the reply through `lmps.client.generation`,
which stops at `<|endoftext|>` or at the next role marker (a model that goes on to write
the user's turn too). The prompt must leave room for the reply: when it would take more
than block_size minus the reply budget, the oldest turns go, a user turn with its reply at
a time, and stay gone. The terminal loop (`session`) reads lines from any text stream, so
a test drives it through stdin.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

from tokenizers import Tokenizer

from lmps.client.generation import Generation, generate_text
from lmps.client.model_io import TrainedModel
from lmps.core.generation import SamplingSettings
from lmps.core.task_data import ROLE_MARKERS, Message, prompt_ids

COMMANDS = "/reset starts over, /exit (or Ctrl-D) ends"


def reply_budget(settings: SamplingSettings, block_size: int) -> int:
    """Tokens of the context kept free for the reply: --max-tokens, but at most half the
    window, so that a long --max-tokens still leaves the prompt room (a reply past the
    window runs on the last block_size tokens, as `lmps generate` does)."""
    return max(1, min(settings.max_new_tokens, block_size // 2))


@dataclass(frozen=True)
class Prompt:
    """What one turn feeds the model."""

    ids: list[int]
    dropped: int
    """Oldest messages left out to fit (user turns and replies)."""
    cut: int
    """Tokens cut from the start when even the newest user turn alone did not fit."""


def fit(
    tokenizer: Tokenizer,
    system: str | None,
    history: list[Message],
    user: str,
    limit: int,
) -> Prompt:
    """The prompt ids of `history` + `user` (after `system`), dropping the oldest turns of
    `history` (a user message and its reply at a time) until they take at most `limit`
    tokens; if the newest user turn alone is too long, its first tokens go (the system
    message and the user's marker with them)."""
    head = [Message("system", system)] if system else []
    turn = [Message("user", user)]
    dropped = 0
    while True:
        ids = prompt_ids(tokenizer, [*head, *history[dropped:], *turn])
        if len(ids) <= limit or dropped >= len(history):
            break
        dropped += 2 if history[dropped].role == "user" else 1
    cut = max(0, len(ids) - limit)
    return Prompt(ids[cut:], min(dropped, len(history)), cut)


@dataclass
class Chat:
    """A conversation: its system message, the turns so far, how to sample each reply."""

    trained: TrainedModel
    settings: SamplingSettings
    system: str | None = None
    history: list[Message] = field(default_factory=list)
    turns: int = 0
    """Replies so far: turn i samples with seed + i (each reply differs, a session repeats)."""

    def prompt(self, user: str) -> Prompt:
        """The next turn's prompt for `user`'s message; drops from `history` the turns that
        no longer fit."""
        block = self.trained.config.block_size
        limit = block - reply_budget(self.settings, block)
        if self.trained.tokenizer is None:
            raise ValueError("this model has no tokenizer to encode the conversation with")
        prompt = fit(self.trained.tokenizer, self.system, self.history, user, limit)
        del self.history[: prompt.dropped]
        return prompt

    def reply(self, user: str, on_text: Callable[[str], None] | None = None) -> Reply:
        """The assistant's answer to `user` (streamed to `on_text`), added to the history."""
        if not user.strip():
            raise ValueError("the message is empty: type something to say")
        prompt = self.prompt(user)
        settings = self.settings
        if settings.seed is not None:
            settings = dataclasses.replace(settings, seed=settings.seed + self.turns)
        done = generate_text(
            self.trained.model,
            self.trained.tokenizer,
            prompt.ids,
            settings,
            stops=ROLE_MARKERS,
            stop_at_eot=True,
            on_text=on_text,
        )
        text = done.text.strip()
        self.history += [Message("user", user), Message("assistant", text)]
        self.turns += 1
        return Reply(text, done, prompt)

    def reset(self) -> None:
        self.history.clear()


@dataclass(frozen=True)
class Reply:
    text: str
    """The reply as kept in the history (surrounding whitespace stripped)."""
    generation: Generation
    prompt: Prompt


def check_chat_model(trained: TrainedModel, source: str) -> str | None:
    """A ValueError for a model that cannot chat; the warning line to print for one that
    was not chat-tuned (a language model); None for an sft model."""
    if trained.tokenizer is None:
        raise ValueError(f"{source} has no tokenizer: `lmps chat` needs one to encode text")
    if trained.task == "classify":
        raise ValueError(
            f"{source} was trained with --task classify: `lmps chat` needs a --task sft "
            "model; use `lmps predict`"
        )
    if trained.task == "lm":
        return (
            f"{source} was trained with --task lm, not chat-tuned (--task sft): its replies "
            "may not follow the conversation"
        )
    return None


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Trimmed:
    """Streams a reply to `out` as the history keeps it: without its leading whitespace,
    and with whitespace written only once more text follows it (none at the end)."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.started = False
        self.pending = ""

    def __call__(self, piece: str) -> None:
        if not self.started:
            piece = piece.lstrip()
            self.started = bool(piece)
        body = piece.rstrip()
        if body:
            self.out.write(self.pending + body)
            self.out.flush()
            self.pending = ""
        self.pending += piece[len(body) :]


def _turn(chat: Chat, user: str, out: IO[str]) -> None:
    reply = chat.reply(user, Trimmed(out))
    out.write("\n")
    out.flush()
    if reply.prompt.dropped:
        _note(
            f"(the conversation outgrew block_size {chat.trained.config.block_size}: dropped "
            f"its {reply.prompt.dropped} oldest message(s))"
        )
    if reply.prompt.cut:
        _note(f"(the message was too long: its first {reply.prompt.cut} tokens were cut)")
    if reply.generation.stopped_by is None and reply.generation.tokens:
        _note(f"(the reply stopped at --max-tokens {chat.settings.max_new_tokens})")


def session(chat: Chat, stdin: IO[str], out: IO[str], *, interactive: bool) -> int:
    """Read a message a line, answer each; /reset clears the history, /exit or the end of
    the input ends. `interactive` (a terminal): show a prompt and the commands."""
    if interactive:
        _note(f"chat: {COMMANDS}")
    while True:
        if interactive:
            try:
                line = input("you> ")
            except EOFError:
                out.write("\n")
                return 0
        else:
            line = stdin.readline()
            if not line:
                return 0
        message = line.rstrip("\r\n")
        command = message.strip()
        if command in ("/exit", "/quit"):
            return 0
        if command == "/reset":
            chat.reset()
            _note("(conversation reset)")
            continue
        if not command:
            continue
        if command.startswith("/") and " " not in command:
            _note(f"unknown command {command}: {COMMANDS}")
            continue
        _turn(chat, message, out)


def cmd_chat(args: argparse.Namespace) -> int:
    from lmps.client.generation import sampling_settings
    from lmps.client.model_io import open_model

    settings = sampling_settings(args)  # bad flags fail before anything is loaded
    if args.prompt is not None and not args.prompt.strip():
        raise ValueError("--prompt is empty: give a message, or leave --prompt out to chat")
    trained, source = open_model(args.model, args.job, args.coordinator)
    warning = check_chat_model(trained, source)
    if warning:
        print(f"lmps: warning: {warning}", file=sys.stderr, flush=True)
    chat = Chat(trained, settings, system=args.system or None)
    if args.prompt is not None:
        _turn(chat, args.prompt, sys.stdout)
        return 0
    return session(chat, sys.stdin, sys.stdout, interactive=sys.stdin.isatty())
