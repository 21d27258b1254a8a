"""The bundled labelled set builtin:pydoc-topics: CPython's pydoc topic help texts cut into
passages of a few hundred characters, each labelled by its topic's family (statement,
expression, builtin-type, data-model, runtime). `lmps.core.task_data.load_labelled` loads it
by name.

Pure Python; deterministic for a given Python's topics; never touches the network.
"""

from __future__ import annotations

import re

BUILTIN_PYDOC_TOPICS = "builtin:pydoc-topics"
"""The bundled labelled set: passages of CPython's pydoc topics, labelled by topic family."""

_TOPIC_FAMILIES = {
    # The simple and compound statements (the language reference, chapters 7 and 8).
    "statement": "assert assignment break compound continue del global import nonlocal pass "
    "raise return yield",
    # Operators, expressions, and the literals and names they are made of.
    "expression": "atom-identifiers atom-literals attribute-references await binary bitwise "
    "booleans calls comparisons conversions dict exprlists floating identifiers imaginary "
    "integers lambda lists numbers operator-summary power shifting slicings strings "
    "subscriptions unary",
    # The built-in types and their methods (the library reference).
    "builtin-type": "bltin-code-objects bltin-ellipsis-object bltin-null-object "
    "bltin-type-objects formatstrings specialattrs string-methods truth typesfunctions "
    "typesmapping typesmethods typesmodules typesseq",
    # Objects, the standard type hierarchy, the special method names.
    "data-model": "objects specialnames types",
    # The execution model (blocks, names, scopes, exceptions) and the debugger.
    "runtime": "debugger execmodel",
}

TOPIC_CLASSES: dict[str, str] = {
    topic: family for family, topics in _TOPIC_FAMILIES.items() for topic in topics.split()
}
"""pydoc topic name -> class of builtin:pydoc-topics (statement, expression, builtin-type,
data-model, runtime). A topic not in this table is left out: those of `TOPIC_SECTIONS`, and
any a newer Python adds (so no passage changes class with the Python version)."""

_SECTIONS_OF = {
    "compound": "async class else for function if try while with",
    "specialnames": "attribute-access callable-types context-managers customization "
    "numeric-types sequence-types",
    "execmodel": "dynamic-features exceptions naming",
    "assignment": "augassign",
    "identifiers": "id-classes",
    "comparisons": "in",
    "typesseq": "typesseq-mutable",
}

TOPIC_SECTIONS: dict[str, str] = {
    section: topic for topic, sections in _SECTIONS_OF.items() for section in sections.split()
}
"""Topics left out of builtin:pydoc-topics because their text repeats, paragraph for
paragraph, inside a bigger topic (section -> the topic that holds it, e.g. "if" is a section
of "compound"): kept, the same passages would sit in both splits."""


_PASSAGE_MIN, _PIECE_MAX = 200, 400  # characters


def _passages(text: str) -> list[str]:
    """`text` cut into passages of _PASSAGE_MIN to about 600 characters: paragraphs (blank-line
    separated; a paragraph over _PIECE_MAX cut at line ends) gathered until the passage has
    _PASSAGE_MIN characters, a shorter tail joined to the passage before it."""
    pieces: list[str] = []
    for paragraph in re.split(r"\n[ \t]*\n", text):
        paragraph = paragraph.strip("\n").rstrip()
        if not paragraph.strip():
            continue
        lines: list[str] = []
        for line in paragraph.split("\n"):
            if lines and len("\n".join([*lines, line])) > _PIECE_MAX:
                pieces.append("\n".join(lines))
                lines = []
            lines.append(line)
        pieces.append("\n".join(lines))
    passages: list[str] = []
    current = ""
    for piece in pieces:
        current = f"{current}\n\n{piece}" if current else piece
        if len(current) >= _PASSAGE_MIN:
            passages.append(current)
            current = ""
    if current and passages:
        passages[-1] = f"{passages[-1]}\n\n{current}"
    elif current:
        passages.append(current)  # a topic shorter than one passage
    return passages


def pydoc_topic_passages() -> tuple[list[str], list[str]]:
    """builtin:pydoc-topics: each topic of `TOPIC_CLASSES` (sorted by name) cut into
    passages (`_passages`), each labelled with its topic's class; a passage that occurs
    twice is kept the first time."""
    from pydoc_data.topics import topics

    texts: list[str] = []
    labels: list[str] = []
    seen: set[str] = set()
    for name in sorted(topics):
        label = TOPIC_CLASSES.get(name)
        if label is None:
            continue
        for passage in _passages(topics[name]):
            if passage not in seen:  # a passage two topics share is kept once
                seen.add(passage)
                texts.append(passage)
                labels.append(label)
    return texts, labels
