"""The output projection and the token embedding it is tied to, stored once in a compact format.

Whisper's output projection (proj_out, vocab x d_model: 51864 x 384 on tiny) is the token
embedding's matrix. In float32 it is the largest tensor of a small model (80 MB on tiny.en, more
than all its quantized linears) and the largest read of every decoding step. `apply_head_format`
replaces the pair by one of:

  fp32    unchanged (nn.Linear + nn.Embedding sharing one float32 weight)
  bf16    LowPrecisionLinear (weight bfloat16, the matmul in bfloat16 with float32 accumulation
          by oneDNN) + LowPrecisionEmbedding reading rows of that weight
  bits8   QuantLinear (8-bit, round to nearest, asymmetric, group `group_size`) + PackedEmbedding
  bits4   the same with 4-bit codes

In every format the matrix is held once: the embedding module keeps a plain reference to the
projection module (not a submodule), so state_dict() holds the projection's tensors only and a
checkpoint stores the tie as one tensor (or one set of packed buffers). The embedding returns rows
of exactly the weight the projection multiplies by (the dequantized rows for bits4/bits8).

Other tools (vLLM, transformers without this package) know only the tied float pair; exports
write it through `dense_head`, which puts it back for the duration of the write.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from fade_kernels.config import DEFAULT_HEAD_GROUP_SIZE, HEAD_FORMATS
from fade_kernels.nn.quant_linear import QuantLinear
from fade_kernels.packing import unpack_qweight, unpack_qzeros


class LowPrecisionLinear(nn.Module):
    """y = x @ W^T with W (N, K) stored in a 16-bit float dtype; x (..., K) float32/bfloat16 is
    cast to W's dtype for the matmul and the result (..., N) is returned in x's dtype."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.weight.dtype}"


class _TiedEmbedding(nn.Module):
    """Base of the embeddings that read their rows from the output projection `head`.

    `head` is kept outside the module tree (object attribute): its tensors belong to the
    projection in state_dict() and in checkpoints. Rows come out in the dtype of the (empty,
    non-persistent) `_dtype` buffer, which follows model.to(dtype) like the rest of the model.
    """

    def __init__(self, head: nn.Module):
        super().__init__()
        object.__setattr__(self, "head", head)
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        device = _device_of(head)
        # A head still on the meta device (checkpoint loading) gets its tensors later; the probe is real now.
        self.register_buffer("_dtype", torch.zeros(0, device="cpu" if device.type == "meta" else device),
                             persistent=False)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: int64 (...) -> (..., embedding_dim) in the model's floating dtype."""
        flat = ids.reshape(-1)
        return self.rows(flat).to(self._dtype.dtype).view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, tied to {type(self.head).__name__}"


class LowPrecisionEmbedding(_TiedEmbedding):
    """Rows of a LowPrecisionLinear's weight (exact: bfloat16 -> float32 is lossless)."""

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head.weight.index_select(0, ids)


class PackedEmbedding(_TiedEmbedding):
    """Rows of a QuantLinear's dequantized weight: row n = (codes[n] - z[n, g]) * s[n, g], the
    same float32 values QuantLinear.dequantize() gives, without dequantizing the whole matrix."""

    def __init__(self, head: QuantLinear):
        super().__init__(head)
        self._zeros_key: tuple | None = None
        self._zeros: torch.Tensor | None = None

    def _unpacked_zeros(self) -> torch.Tensor:
        """int32 (N, G) zero points, unpacked once per qzeros tensor (it changes only on load)."""
        qzeros = self.head.qzeros
        key = (qzeros.data_ptr(), qzeros._version, qzeros.device)
        if key != self._zeros_key:
            self._zeros = unpack_qzeros(qzeros, self.head.bits, self.head.out_features)
            self._zeros_key = key
        return self._zeros

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        head = self.head
        codes = unpack_qweight(head.qweight.index_select(1, ids), head.bits).float()          # (n, K)
        zeros = self._unpacked_zeros().index_select(0, ids).float()                             # (n, G)
        scales = head.scales.index_select(1, ids).float().t()                                   # (n, G)
        group = head.g_idx.long()
        return (codes - zeros[:, group]) * scales[:, group]


def _device_of(module: nn.Module) -> torch.device:
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


def head_format(model: nn.Module) -> str:
    """The format of `model`'s output projection: one of HEAD_FORMATS."""
    head = model.get_output_embeddings()
    if isinstance(head, QuantLinear):
        return f"bits{head.bits}"
    if isinstance(head, LowPrecisionLinear):
        return "bf16"
    return "fp32"


def _check_tied(model: nn.Module) -> tuple[nn.Linear, nn.Embedding]:
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if not isinstance(head, nn.Linear) or not isinstance(embedding, nn.Embedding):
        raise ValueError(f"the head format applies to an nn.Linear output projection tied to an nn.Embedding; "
                         f"this model has {type(head).__name__} and {type(embedding).__name__}")
    if head.weight.data_ptr() != embedding.weight.data_ptr() or head.bias is not None:
        raise ValueError("the output projection is not tied to the token embedding (or has a bias): "
                         "its compact format would change the embedding too")
    return head, embedding


def _install(model: nn.Module, head: nn.Module, embedding: nn.Module) -> None:
    model.set_output_embeddings(head)
    model.set_input_embeddings(embedding)
    # The tie now lives in the embedding module; transformers must not re-tie a `.weight`.
    model.config.tie_word_embeddings = False
    if hasattr(model, "all_tied_weights_keys"):
        model.all_tied_weights_keys = {}


def apply_head_format(model: nn.Module, fmt: str, group_size: int = DEFAULT_HEAD_GROUP_SIZE,
                      solve: Callable[[torch.Tensor, int, int], QuantLinear] | None = None) -> None:
    """Store `model`'s tied output projection + token embedding in format `fmt` (HEAD_FORMATS),
    in place. bits4/bits8 quantize the float32 matrix (vocab, d_model), asymmetric, in groups of
    `group_size` columns: with round to nearest, or with solve(weight, bits, group_size) ->
    QuantLinear when given (pipeline/head_calibration.py). "fp32" leaves the model unchanged.
    Raises ValueError when the projection is not an nn.Linear tied to an nn.Embedding."""
    if fmt not in HEAD_FORMATS:
        raise ValueError(f"head format must be one of {HEAD_FORMATS}, got {fmt!r}")
    if fmt == "fp32":
        return
    linear, _ = _check_tied(model)
    if fmt == "bf16":
        head: nn.Module = LowPrecisionLinear(linear.weight.detach().to(torch.bfloat16))
        embedding: nn.Module = LowPrecisionEmbedding(head)
    else:
        bits = int(fmt[4:])
        if solve is None:
            head = QuantLinear.from_linear(linear, bits=bits, group_size=group_size)
        else:
            head = solve(linear.weight.detach(), bits, group_size)
        embedding = PackedEmbedding(head)
    _install(model, head, embedding)


def prepare_head_for_loading(model: nn.Module, fmt: str | None) -> None:
    """Give a model built on the meta device (checkpoint loading) the module layout of head
    format `fmt`, so that the checkpoint's tensors fill it: for bits4/bits8 proj_out is already a
    QuantLinear (listed in quantization_config.modules) and gets its PackedEmbedding; for bf16 a
    meta LowPrecisionLinear and its embedding are put in. None or "fp32": nothing to do."""
    if fmt in (None, "fp32"):
        return
    if fmt not in HEAD_FORMATS:
        raise ValueError(f"unknown head format {fmt!r} (known: {', '.join(HEAD_FORMATS)})")
    head = model.get_output_embeddings()
    if fmt == "bf16":
        with torch.device("meta"):
            head = LowPrecisionLinear(torch.empty(head.out_features, head.in_features, dtype=torch.bfloat16))
        _install(model, head, LowPrecisionEmbedding(head))
        return
    if not isinstance(head, QuantLinear) or head.bits != int(fmt[4:]):
        raise ValueError(f"head format {fmt} needs a {fmt[4:]}-bit quantized output projection, "
                         f"got {type(head).__name__}")
    _install(model, head, PackedEmbedding(head))


def finish_head_after_loading(model: nn.Module) -> None:
    """After tensors were assigned: a bf16 head keeps bfloat16 even if the loader cast the
    model's floating tensors to another dtype; the embedding's output dtype follows the model's."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if isinstance(head, LowPrecisionLinear) and head.weight.dtype != torch.bfloat16:
        head.weight = nn.Parameter(head.weight.detach().to(torch.bfloat16), requires_grad=False)
    if isinstance(embedding, _TiedEmbedding):
        own = {id(t) for t in (*head.parameters(), *head.buffers())}
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point() and id(p) not in own),
                     torch.float32)
        embedding._dtype = torch.zeros(0, dtype=dtype, device=_device_of(head))


def dense_head_weight(model: nn.Module) -> torch.Tensor:
    """float32 (vocab, d_model): the matrix `model`'s output projection multiplies by, in any head
    format (a QuantLinear's dequantized weight, a bf16 weight widened exactly)."""
    head = model.get_output_embeddings()
    if isinstance(head, QuantLinear):
        return head.dequantize().float()
    return head.weight.detach().float()


@contextmanager
def dense_head(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, `model` holds its output projection and token embedding as the plain
    tied float32 pair (nn.Linear + nn.Embedding sharing dense_head_weight(model), the config's
    tie_word_embeddings true), which is what other tools load; on exit the compact modules come
    back unchanged. A model already in "fp32" is left as it is."""
    if head_format(model) == "fp32":
        yield model
        return
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    tie_word_embeddings = model.config.tie_word_embeddings
    tied_keys = getattr(model, "all_tied_weights_keys", None)
    weight = nn.Parameter(dense_head_weight(model), requires_grad=False)
    linear = nn.Linear(head.in_features, head.out_features, bias=False, device=weight.device)
    plain = nn.Embedding(head.out_features, head.in_features, device=weight.device)
    linear.weight = plain.weight = weight
    model.set_output_embeddings(linear)
    model.set_input_embeddings(plain)
    model.config.tie_word_embeddings = True
    if tied_keys is not None:
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=False)
    try:
        yield model
    finally:
        model.set_output_embeddings(head)
        model.set_input_embeddings(embedding)
        model.config.tie_word_embeddings = tie_word_embeddings
        if tied_keys is not None:
            model.all_tied_weights_keys = tied_keys
