"""Text conditions: a frozen text encoder run once at ingestion, its embeddings kept in the store.

A caption becomes the encoder's last hidden states, one D-vector per token (padding dropped):
transformers' `T5EncoderModel` or `CLIPTextModel` (chosen by the folder's `config.json`),
loaded from a local folder or a hub id (`pip install -e '.[text]'`, which brings torch and
transformers). The embeddings are stored in the record's `extra["text"]` (`pack`: float16,
base64, with their shape) beside `extra["caption"]`; training and sampling never run the
encoder: the model's `ConditionEmbed` projects the stored embeddings into its width
(`model.conditions.text_dim` = the encoder's width, `text_tokens` = the padded length).

Captions of a folder of videos come from a sidecar file per video (`caption_path`):
`clips/a.mp4` + `clips/a.txt`, the caption being the text file's content, stripped.

`make_tiny_encoder` writes a small random T5 encoder with a word-level tokenizer into a folder
(no download): the tests' encoder and the text_to_video recipe's embedded default.
"""
from __future__ import annotations

import base64
import functools
import os
from collections.abc import Sequence

import numpy as np

_STORED = np.dtype("<f2")


def pack(embedding_ND) -> dict:
    """Embeddings [N, D] -> a JSON-ready dict (float16, base64) for a record's `extra`."""
    e = np.asarray(embedding_ND, np.float32)
    if e.ndim != 2:
        raise ValueError(f"text embedding: expected [tokens, dim], got shape {e.shape}")
    return {"shape": [int(s) for s in e.shape], "dtype": "float16",
            "data": base64.b64encode(e.astype(_STORED).tobytes()).decode("ascii")}


def unpack(packed: dict) -> np.ndarray:
    """`pack`'s dict -> float32 [N, D]."""
    try:
        raw = base64.b64decode(packed["data"])
        return np.frombuffer(raw, _STORED).reshape(packed["shape"]).astype(np.float32)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"text embedding: not a packed embedding ({type(e).__name__}: {e})") from e


def pad(embedding_ND, tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """[N, D] -> ([tokens, D] zero-padded or truncated, mask [tokens] of the real ones)."""
    e = np.asarray(embedding_ND, np.float32)[:tokens]
    out = np.zeros((tokens, e.shape[1]), np.float32)
    out[:len(e)] = e
    return out, np.arange(tokens) < len(e)


def caption_path(video_path: str) -> str:
    """The sidecar caption file of a video: the same path with the extension `.txt`."""
    return os.path.splitext(video_path)[0] + ".txt"


def read_caption(video_path: str) -> str | None:
    """The video's sidecar caption (stripped), or None when it has no sidecar file."""
    path = caption_path(video_path)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


class TextEncoder:
    """A frozen transformers text encoder: captions -> per-token embeddings [n_i, D]."""

    def __init__(self, name_or_path: str, max_tokens: int = 32):
        try:
            import torch
            import transformers
        except ImportError as e:
            raise ImportError("text encoders need torch and transformers: "
                              "pip install -e '.[text]'") from e
        config = transformers.AutoConfig.from_pretrained(name_or_path)
        kind = config.model_type
        if kind in ("t5", "mt5", "umt5"):
            cls = transformers.T5EncoderModel
        elif kind in ("clip", "clip_text_model"):
            cls = transformers.CLIPTextModel
        else:
            raise ValueError(f"text encoder {name_or_path!r}: model type {kind!r}; expected a "
                             "T5 or CLIP text encoder")
        self.name, self.max_tokens, self._torch = name_or_path, int(max_tokens), torch
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path)
        self.model = cls.from_pretrained(name_or_path).eval()
        self.dim = int(self.model.config.hidden_size if kind.startswith("clip")
                       else self.model.config.d_model)

    def encode(self, captions: Sequence[str], batch: int = 64) -> list[np.ndarray]:
        """One float32 [n_i, D] per caption (its real tokens, at most `max_tokens`)."""
        out = []
        for i in range(0, len(captions), batch):
            enc = self.tokenizer(list(captions[i:i + batch]), padding=True, truncation=True,
                                 max_length=self.max_tokens, return_tensors="pt")
            with self._torch.no_grad():
                hidden = self.model(input_ids=enc["input_ids"],
                                    attention_mask=enc["attention_mask"]).last_hidden_state
            hidden = hidden.float().numpy()
            for h, n in zip(hidden, enc["attention_mask"].sum(1).tolist()):
                out.append(np.ascontiguousarray(h[:max(int(n), 1)], np.float32))
        return out


@functools.lru_cache(maxsize=2)
def load(name_or_path: str, max_tokens: int = 32) -> TextEncoder:
    """The encoder at `name_or_path`, loaded once per process (ingestion workers share it)."""
    return TextEncoder(name_or_path, max_tokens)


def embed_extra(encoder: TextEncoder, captions: Sequence[str]) -> list[dict]:
    """The `extra` entries of videos with these captions: {caption, text (packed)} each."""
    return [{"caption": c, "text": pack(e)} for c, e in zip(captions, encoder.encode(captions))]


def make_tiny_encoder(path: str, words: Sequence[str], *, dim: int = 32, layers: int = 1,
                      heads: int = 2, seed: int = 0) -> str:
    """Write a random T5 encoder of width `dim` with a lower-case word-level tokenizer over
    `words` (others map to <unk>) into `path`; returns `path`. Deterministic in `seed`."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in words:
        vocab.setdefault(w.lower(), len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                            eos_token="</s>").save_pretrained(path)
    config = T5Config(vocab_size=len(vocab), d_model=dim, d_kv=dim // heads, d_ff=2 * dim,
                      num_layers=layers, num_heads=heads, pad_token_id=0, eos_token_id=1,
                      decoder_start_token_id=0, dropout_rate=0.0)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = T5EncoderModel(config)
    model.save_pretrained(path)
    return path
