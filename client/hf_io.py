"""Hugging Face GPT-2 folders in and out: `lmps export --format hf` writes what
`GPT2LMHeadModel.from_pretrained` (a classifier: `GPT2ForSequenceClassification`) and
`AutoTokenizer.from_pretrained` load; `lmps train --init-from hf:DIR` reads a
`save_pretrained` folder of a GPT-2-family model and its tokenizer, a
GPT2ForSequenceClassification folder as a classify model (num_labels, labels from
id2label, `score.weight`). The name and layout mapping is `lmps.core.hf` (with the pooling
and padding rule of exported classifiers); this module reads and writes the files.
`transformers` (`pip install 'lmps[hf]'`) is imported only here, only when called.

Every refusal is a ValueError whose message is one line naming the folder or file and what
to do (the CLI prints it and exits 2).
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from lmps.core import hf
from lmps.core.data import EOT
from lmps.core.model import GPT, GPTConfig
from lmps.core.tasks import TaskName

if TYPE_CHECKING:
    from types import ModuleType

    from lmps.client.model_io import TrainedModel

PREFIX = "hf:"
"""`--init-from hf:DIR` names a Hugging Face folder (without it, an lmps run folder)."""

INSTALL = "pip install 'lmps[hf]'"

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
"""What `from_pretrained` reads weights from, one of them per folder."""


def transformers_module() -> ModuleType:
    """`transformers`, or a ValueError saying how to install it."""
    missing = f"Hugging Face interop needs the transformers package: {INSTALL}"
    if importlib.util.find_spec("transformers") is None:
        raise ValueError(missing)
    try:
        import transformers
    except ImportError as err:  # installed but broken (a missing dependency, say)
        raise ValueError(f"{missing} ({_one_line(err)})") from None

    # Loading problems are checked and reported here, in one line; its own chatter is noise.
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    return transformers


# -- in: --init-from hf:DIR ------------------------------------------------------------------


def check(path: Path) -> GPTConfig:
    """Cheap checks of a Hugging Face folder, without loading the weights: the folder, a
    GPT-2 config.json lmps can run, a tokenizer, a weights file, transformers installed."""
    where = f"{PREFIX}{path}"
    if not path.is_dir():
        raise ValueError(
            f"{where}: no such folder; pass a folder written by "
            "model.save_pretrained(DIR) and tokenizer.save_pretrained(DIR)"
        )
    config = read_config(path / "config.json")
    if not any((path / name).exists() for name in WEIGHT_FILES):
        raise ValueError(
            f"{where}: no weights ({' or '.join(WEIGHT_FILES[::2])}); "
            "write them with model.save_pretrained(DIR)"
        )
    if not _tokenizer_files(path):
        raise ValueError(
            f"{where}: no tokenizer (tokenizer.json, or vocab.json + merges.txt); "
            "write it with tokenizer.save_pretrained(DIR)"
        )
    transformers_module()
    return config


def read_config(path: Path) -> GPTConfig:
    """A Hugging Face config.json as a GPTConfig; ValueError naming the file otherwise."""
    return _read_hf_config(path)[0]


def _read_hf_config(path: Path) -> tuple[GPTConfig, tuple[str, ...]]:
    """config.json's GPTConfig and (a classifier's) labels in class-id order."""
    if not path.is_file():
        raise ValueError(f"{path} is missing: not a save_pretrained folder")
    try:
        fields = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({_one_line(err)})") from None
    if not isinstance(fields, dict):
        raise ValueError(f"{path}: expected a JSON object")
    try:
        return hf.from_hf_config(fields), hf.labels_from_hf(fields)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {_one_line(err)}") from None


class Loaded(NamedTuple):
    """What `load` reads, in `model_io.TrainedModel`'s field order:
    `TrainedModel(*load(path))` is the folder as a trained model."""

    model: GPT
    config: GPTConfig
    tokenizer: Tokenizer
    version: int = 0
    task: TaskName = "lm"
    labels: tuple[str, ...] = ()
    """classify: class names, index = class id (config.json's id2label)."""


def load(path: Path) -> Loaded:
    """The model and tokenizer of a Hugging Face GPT-2 folder as an lmps model (fp32); a
    GPT2ForSequenceClassification folder (config.json's architectures) as a classify model
    with its labels. `model_io.load_init("hf:DIR")` makes them a TrainedModel."""
    check(path)
    config, labels = _read_hf_config(path / "config.json")
    tokenizer = read_tokenizer(path)
    where = f"{PREFIX}{path}"
    if tokenizer.token_to_id(EOT) is None:
        raise ValueError(
            f"{where}: the tokenizer has no {EOT} token, which lmps puts between documents"
        )
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise ValueError(
            f"{where}: incompatible tokenizer: {tokenizer.get_vocab_size()} tokens but only "
            f"{config.vocab_size} embeddings (vocab_size in config.json)"
        )
    transformers = transformers_module()
    model_class = getattr(transformers, hf.architecture(config))
    try:
        model, info = model_class.from_pretrained(
            str(path), dtype=torch.float32, output_loading_info=True, local_files_only=True
        )
    except Exception as err:  # OSError, RuntimeError (shapes), safetensors' own errors
        raise ValueError(f"{where}: cannot load the weights ({_one_line(err)})") from None
    missing = [k for k in info.get("missing_keys", []) if not k.endswith(hf.HF_BUFFERS)]
    mismatched = info.get("mismatched_keys", [])
    if missing or mismatched:
        names = [str(k[0] if isinstance(k, tuple) else k) for k in [*missing, *mismatched]]
        raise ValueError(
            f"{where}: incompatible weights ({', '.join(names[:3])} "
            f"{'missing' if missing else 'of the wrong shape'}); the weights do not fit "
            "config.json"
        )
    try:
        params = hf.from_hf(model.state_dict(), config)
    except ValueError as err:
        raise ValueError(f"{where}: {_one_line(err)}") from None
    del model
    lmps_model = GPT(config)
    with torch.no_grad():
        for name, p in lmps_model.named_parameters():
            p.copy_(params[name])
    if config.num_labels:
        return Loaded(lmps_model, config, tokenizer, task="classify", labels=labels)
    return Loaded(lmps_model, config, tokenizer)


def read_tokenizer(path: Path) -> Tokenizer:
    """The folder's tokenizer as a `tokenizers` Tokenizer: its tokenizer.json as it is, or a
    byte-level BPE built from vocab.json + merges.txt (GPT-2's slow-tokenizer files), with
    the special tokens tokenizer_config.json / special_tokens_map.json name."""
    if (path / "tokenizer.json").is_file():
        try:
            return Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as err:  # tokenizers raises a bare Exception
            raise ValueError(
                f"{path / 'tokenizer.json'}: not a tokenizer ({_one_line(err)})"
            ) from None
    vocab, merges = path / "vocab.json", path / "merges.txt"
    try:
        bpe = models.BPE.from_file(str(vocab), str(merges))
    except Exception as err:
        raise ValueError(f"{vocab} + {merges}: not a BPE vocabulary ({_one_line(err)})") from None
    settings = _json_object(path / "tokenizer_config.json")
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(
        add_prefix_space=bool(settings.get("add_prefix_space", False))
    )
    tokenizer.decoder = decoders.ByteLevel()
    # GPT-2's vocab.json holds <|endoftext|> (50256): marked special it keeps that id; one
    # that is not in the vocabulary is appended, as transformers' slow tokenizer does.
    specials = _special_tokens(path, settings)
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in specials])
    return tokenizer


def _tokenizer_files(path: Path) -> bool:
    return (path / "tokenizer.json").is_file() or (
        (path / "vocab.json").is_file() and (path / "merges.txt").is_file()
    )


def _special_tokens(path: Path, settings: dict[str, Any]) -> list[str]:
    """<|endoftext|> and the special tokens the folder's settings name, in that order
    (lmps needs the first between documents; GPT-2's settings name only it)."""
    found = [EOT]
    for source in (settings, _json_object(path / "special_tokens_map.json")):
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            value = source.get(key)
            token = value.get("content") if isinstance(value, dict) else value
            if isinstance(token, str) and token not in found:
                found.append(token)
    return found


def _json_object(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({_one_line(err)})") from None
    return value if isinstance(value, dict) else {}


# -- out: lmps export --format hf ------------------------------------------------------------


def save(trained: TrainedModel, out: Path) -> None:
    """Write `trained` as a Hugging Face GPT-2 folder: config.json, model.safetensors,
    generation_config.json (GPT2LMHeadModel.save_pretrained; a classifier's is a
    GPT2ForSequenceClassification with its labels as id2label, see `lmps.core.hf` for its
    padding rule) and the tokenizer (GPT2TokenizerFast.save_pretrained: tokenizer.json,
    tokenizer_config.json). Refusals (no biases, mean pooling, labels that do not fit the
    head) come before anything is written."""
    if trained.tokenizer is None:
        raise ValueError("this model has no tokenizer; a Hugging Face folder needs one")
    config = trained.config
    eot_id = trained.tokenizer.token_to_id(EOT)
    try:
        params = hf.to_hf(dict(trained.model.named_parameters()), config)
        hf_config = hf.to_hf_config(config, eot_id, trained.labels)
    except ValueError as err:
        raise ValueError(f"cannot export to Hugging Face: {_one_line(err)}") from None
    transformers = transformers_module()
    model_class = getattr(transformers, hf.architecture(config))
    model = model_class(transformers.GPT2Config(**hf_config))
    model.load_state_dict(params, strict=True)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    # GPT-2's: <|endoftext|> is bos, eos and unk (None: not added to a vocabulary without it).
    token = EOT if eot_id is not None else None
    special = {"bos_token": token, "eos_token": token, "unk_token": token}
    tokenizer = transformers.GPT2TokenizerFast(
        # A copy: the wrapper sets padding/truncation on the object it is given.
        tokenizer_object=Tokenizer.from_str(trained.tokenizer.to_str()),
        model_max_length=config.block_size,
        **special,
    )
    tokenizer.save_pretrained(str(out))


def _one_line(err: BaseException, limit: int = 200) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
