"""Tokenizers: pretrained (local/cached) or a tiny byte-level BPE trained offline, plus the `<image>` token."""

from __future__ import annotations

import os
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path

from vlmtrain.errors import ConfigError, VlmtrainError
from vlmtrain.model.chat_templates import TEMPLATES, render_template

TINY_SPECIALS = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]


def _tiny_corpus() -> list[str]:
    """Offline English text for the tiny BPE: scikit-learn's dataset descriptions plus digit/colour words.

    Byte-level BPE covers every byte, so any text still encodes; the corpus only shapes merges. The files are
    found without importing scikit-learn (its import, with SciPy's, is seconds of every process's start-up).
    """
    descr = Path(find_spec("sklearn").origin).parent / "datasets" / "descr"
    texts = [p.read_text(errors="ignore") for p in sorted(descr.glob("*.rst"))]
    words = "zero one two three four five six seven eight nine ten digit number image picture photo shows what " \
            "which is the a an this of in yes no answer question caption describe handwritten black white"
    texts += [words] * 20
    return texts


@lru_cache(maxsize=8)
def train_tiny_bpe(vocab_size: int) -> str:
    """Train and return the serialized tokenizer JSON (cached per process; training takes well under a second)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=TINY_SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_tiny_corpus(), trainer=trainer)
    return tok.to_str()


def build_tiny_tokenizer(vocab_size: int, image_token: str = "<image>"):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(train_tiny_bpe(vocab_size)),
        bos_token="<|bos|>", eos_token="<|end|>", pad_token="<|pad|>",
    )
    tok.chat_template = render_template("vlmtrain_tiny", image_token)
    return tok


def build_tokenizer(cfg):
    """Tokenizer for a ModelConfig, with the image token added as a special token and a chat template set."""
    tcfg = cfg.tokenizer
    if tcfg.pretrained is None and tcfg.tiny_bpe_vocab is not None:
        tok = build_tiny_tokenizer(tcfg.tiny_bpe_vocab, cfg.image_token)
    else:
        from transformers import AutoTokenizer

        src = tcfg.pretrained or cfg.llm.pretrained
        try:
            tok = AutoTokenizer.from_pretrained(src, trust_remote_code=False)  # no "run the custom code?" prompt
        except (OSError, ValueError) as e:
            raise VlmtrainError(f"tokenizer: cannot load {src!r} offline ({str(e).splitlines()[0]})") from None
    if cfg.image_token not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [cfg.image_token]})
    if tok.pad_token is None:
        # Padding positions are masked everywhere; reusing EOS (or UNK) adds no embedding row.
        tok.pad_token = tok.eos_token or tok.unk_token
    if tcfg.chat_template is not None:
        if tcfg.chat_template not in TEMPLATES and "{%" not in tcfg.chat_template:
            raise ConfigError(f"tokenizer.chat_template: unknown template {tcfg.chat_template!r} "
                              f"(choose from: {', '.join(TEMPLATES)}, or give Jinja)")
        tok.chat_template = render_template(tcfg.chat_template, cfg.image_token)
    elif tok.chat_template is None:
        raise ConfigError("tokenizer.chat_template: this tokenizer has no chat template; set one "
                          f"({', '.join(TEMPLATES)}, or Jinja)")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return tok


def embedding_rows(tokenizer_len: int, config_vocab: int, multiple: int) -> int:
    """Rows the LM embedding needs: grow only when the tokenizer outgrows the config, padded to `multiple`."""
    if tokenizer_len <= config_vocab:
        return config_vocab
    return -(-tokenizer_len // multiple) * multiple
