"""umT5 text encoder (transformers ``UMT5EncoderModel``) and its tokenizer.

Wan behaviour (code study section 1.4): prompts are whitespace-cleaned, tokenised with a
trailing ``</s>``, padded/truncated to a fixed length (512 at full size), encoded with the
attention mask, and every output row past the prompt's true length is set to zero; the DiT's
cross-attention then attends all ``max_length`` rows.

Real weights come from a diffusers-format Wan2.2 folder (``text_encoder/`` + ``tokenizer/``).
Random-weight presets use :func:`build_offline_tokenizer`, a deterministic WordPiece
tokenizer built with the ``tokenizers`` library, so nothing is downloaded.
"""

from __future__ import annotations

import re
import string
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import torch
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece
from transformers import AutoTokenizer, PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from impl.config import TextEncoderConfig

__all__ = [
    "PAD_ID",
    "EOS_ID",
    "UNK_ID",
    "build_text_encoder",
    "build_offline_tokenizer",
    "load_text_encoder",
    "load_tokenizer",
    "clean_prompt",
    "TextEncoder",
]

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
_SPECIALS = ("<pad>", "</s>", "<unk>")
_LETTERS = string.ascii_lowercase
_ALNUM = _LETTERS + string.digits
# Common caption words first, so small vocabularies still get whole-word tokens. Fixed order:
# the vocabulary (and so every token id) must not change between runs or machines.
_WORDS = (
    "the a an and of in on with to is are at as by for from into its it this that his her "
    "their they he she we you while over under near behind front back left right up down "
    "camera shot scene video view close wide slow fast motion moving moves walks walking runs "
    "running looks looking stands standing sits sitting holds holding turns light dark bright "
    "sun sunlight night day sky cloud clouds water sea ocean river lake rain snow wind fire "
    "tree trees forest grass flower flowers field mountain mountains road street city car "
    "building house room window door table chair man woman person people child girl boy dog "
    "cat bird horse fish face eyes hand hands hair head body red blue green yellow white black "
    "gray orange purple pink brown golden soft warm cold small large big tall long short old "
    "young new beautiful cinematic realistic detailed background foreground lighting style "
    "color colors shadow shadows reflection smoke dust glow neon transitions then again begins "
    "continues slowly quickly gently through across along around between toward away "
    "high low quality scene_cut".split()
)


def clean_prompt(text: str) -> str:
    """Wan's whitespace cleaning: collapse runs of whitespace and strip the ends."""
    return re.sub(r"\s+", " ", text).strip()


def _offline_vocab(vocab_size: int) -> dict[str, int]:
    pieces: list[str] = list(_SPECIALS)
    pieces += list(_ALNUM) + list(string.punctuation)
    pieces += ["##" + c for c in _ALNUM]  # word continuations: any ASCII word is tokenisable
    minimum = len(pieces)
    if vocab_size < minimum:
        raise ValueError(f"build_offline_tokenizer: vocab_size must be >= {minimum} "
                         f"(specials, characters, continuations), got {vocab_size}")
    seen = set(pieces)
    extra = [w for w in _WORDS if w not in seen]
    extra += ["##" + a + b for a in _LETTERS for b in _LETTERS]  # letter-pair continuations
    for piece in extra:
        if len(pieces) >= vocab_size:
            break
        if piece not in seen:
            seen.add(piece)
            pieces.append(piece)
    return {p: i for i, p in enumerate(pieces)}


def build_offline_tokenizer(vocab_size: int, max_length: int) -> PreTrainedTokenizerFast:
    """A deterministic T5-like tokenizer built offline: <pad>=0, </s>=1, <unk>=2.

    Lower-cases and strips accents, splits on whitespace and punctuation, WordPiece over a
    fixed vocabulary of characters, common words and letter pairs (truncated to
    ``vocab_size``), and appends ``</s>`` like T5. Characters outside ASCII become <unk>.
    """
    if max_length < 1:
        raise ValueError(f"build_offline_tokenizer: max_length must be >= 1, got {max_length}")
    vocab = _offline_vocab(vocab_size)
    tok = Tokenizer(WordPiece(vocab=vocab, unk_token="<unk>", max_input_chars_per_word=100))
    tok.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.StripAccents(),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", EOS_ID)])
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        model_max_length=max_length, padding_side="right", truncation_side="right")


def _umt5_config(cfg: TextEncoderConfig) -> UMT5Config:
    return UMT5Config(
        vocab_size=cfg.vocab_size,
        d_model=cfg.d_model,
        d_kv=cfg.d_kv,
        d_ff=cfg.d_ff,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance,
        feed_forward_proj="gated-gelu",  # sets dense_act_fn = gelu_new, as umT5-XXL
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        architectures=["UMT5EncoderModel"],
    )


def build_text_encoder(cfg: TextEncoderConfig, dtype: torch.dtype = torch.float32,
                       device: str | torch.device = "cpu", seed: int | None = None) -> UMT5EncoderModel:
    """Randomly initialised ``UMT5EncoderModel``; ``seed`` leaves the global RNG untouched."""
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        model = UMT5EncoderModel(_umt5_config(cfg))
    return model.to(device=device, dtype=dtype).eval()


def _resolve_folder(path: str | Path, subfolder: str, markers: Sequence[str], what: str) -> Path:
    """Accept the component folder itself or a diffusers pipeline root holding ``subfolder``."""
    root = Path(path)
    for folder in (root, root / subfolder):
        if any((folder / m).is_file() for m in markers):
            return folder
    raise FileNotFoundError(
        f"{what}: none of {list(markers)} found at {root} or {root / subfolder}; expected a "
        f"diffusers-format folder (e.g. Wan2.2-TI2V-5B-Diffusers/{subfolder}). "
        f"Weights cannot be downloaded here.")


def load_text_encoder(path: str | Path, dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu") -> UMT5EncoderModel:
    """Load ``UMT5EncoderModel`` from a local folder (or a pipeline root with ``text_encoder/``)."""
    folder = _resolve_folder(path, "text_encoder", ["config.json"], "load_text_encoder")
    model = UMT5EncoderModel.from_pretrained(folder, dtype=dtype, local_files_only=True)
    return model.to(device=device, dtype=dtype).eval()


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer from a local folder (or a pipeline root with ``tokenizer/``)."""
    folder = _resolve_folder(path, "tokenizer", ["tokenizer.json", "tokenizer_config.json"],
                             "load_tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    tokenizer.padding_side = "right"  # zeroing rows past the length assumes right padding
    return tokenizer


class TextEncoder:
    """Tokenizer + umT5 encoder: prompts -> [B, max_length, d_model], zero past each length.

    ``encode`` memoises the embedding of each (cleaned) prompt in a small LRU cache, because
    streaming inference re-encodes the same shot prompt for every block. The cache assumes
    frozen weights: call :meth:`clear_cache` after changing the model.
    """

    def __init__(self, model: UMT5EncoderModel, tokenizer: Any, max_length: int,
                 cache_size: int = 64) -> None:
        if max_length < 1:
            raise ValueError(f"TextEncoder.max_length must be >= 1, got {max_length}")
        if cache_size < 0:
            raise ValueError(f"TextEncoder.cache_size must be >= 0 (0 disables), got {cache_size}")
        if len(tokenizer) > model.config.vocab_size:
            raise ValueError(f"TextEncoder: tokenizer has {len(tokenizer)} tokens but the model's "
                             f"vocab_size is {model.config.vocab_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.cache_size = cache_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @classmethod
    def from_preset(cls, cfg: TextEncoderConfig, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", seed: int = 0,
                    cache_size: int = 64) -> "TextEncoder":
        """Random weights (seeded) with the offline tokenizer."""
        model = build_text_encoder(cfg, dtype=dtype, device=device, seed=seed)
        tokenizer = build_offline_tokenizer(cfg.vocab_size, cfg.max_length)
        return cls(model, tokenizer, cfg.max_length, cache_size)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", max_length: int = 512,
                        cache_size: int = 64, tokenizer_path: str | Path | None = None) -> "TextEncoder":
        """Load from local folders: ``path`` is a pipeline root (``text_encoder/`` and
        ``tokenizer/``) or the text-encoder folder, with ``tokenizer_path`` then if separate."""
        model = load_text_encoder(path, dtype=dtype, device=device)
        tokenizer = load_tokenizer(tokenizer_path if tokenizer_path is not None else path)
        return cls(model, tokenizer, max_length, cache_size)

    @property
    def d_model(self) -> int:
        return int(self.model.config.d_model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def clear_cache(self) -> None:
        self._cache.clear()

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cleaned prompts -> (input_ids, attention_mask), both [B, max_length] int64."""
        batch = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                               max_length=self.max_length, add_special_tokens=True,
                               return_attention_mask=True, return_tensors="pt")
        return batch["input_ids"], batch["attention_mask"]

    @torch.no_grad()
    def _encode_uncached(self, prompts: Sequence[str]) -> torch.Tensor:
        ids, mask = self.tokenize(prompts)
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        # Wan keeps only the true-length rows; the rest are zero (not the model's padding output).
        return hidden.masked_fill(~mask.bool().unsqueeze(-1), 0.0)

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> embeddings [B, max_length, d_model] (model dtype and device), no grad."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("TextEncoder.encode: prompts must be a list of str "
                            f"(wrap a single prompt in a list), got {type(prompts).__name__}")
        if len(prompts) == 0:
            raise ValueError("TextEncoder.encode: prompts is empty")
        cleaned = [clean_prompt(p) for p in prompts]
        found: dict[str, torch.Tensor] = {}
        for p in cleaned:
            if p in self._cache:
                self._cache.move_to_end(p)
                found[p] = self._cache[p]
        missing = list(dict.fromkeys(p for p in cleaned if p not in found))
        if missing:
            for p, row in zip(missing, self._encode_uncached(missing)):
                found[p] = row.clone()  # own storage: do not pin the whole batch in the cache
                self._remember(p, found[p])
        return torch.stack([found[p] for p in cleaned])  # a copy: callers cannot touch the cache

    def _remember(self, prompt: str, row: torch.Tensor) -> None:
        if self.cache_size == 0:
            return
        self._cache[prompt] = row
        self._cache.move_to_end(prompt)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.encode(prompts)
