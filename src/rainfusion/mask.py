"""BlockSparseMask: which key blocks each query block visits.

The format is the one every backend reads (the same information as FlexAttention's
``kv_num_blocks`` / ``kv_indices``), sized to the kept blocks:

- ``counts``  int32 [B, H, q_blocks]: how many key blocks the query block visits;
- ``indices`` int32 [B, H, q_blocks, width]: the visited key blocks, ascending, in the first
  ``counts`` slots (the rest is ignored).

A row whose count equals ``kv_blocks`` is *full*: it visits every key block in order and reads
no entries of ``indices``. So the table only needs the width of the widest non-full row, and
forced-dense rows (text, first-frame sink) cost no storage.

This is the mask-row contract every kernel relies on: a count is in [0, kv_blocks]; a non-full
row's count is at most the table width and its listed blocks are in [0, kv_blocks) and strictly
ascending. A mask built with the constructor is checked against it (``validate``: one host
synchronisation); the masks rainfusion builds itself (predictors, patterns, ``from_dense``,
``full``, ``expand``) pass ``check=False``, so the attention hot path never synchronises.
"""

from __future__ import annotations

from dataclasses import InitVar, dataclass

import torch

BLOCK_SIZES = (64, 128)


def check_block_size(block_size: object, name: str = "block_size") -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"{name} must be an int (64 or 128), got {type(block_size).__name__}")
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"{name} must be one of {BLOCK_SIZES}, got {block_size}")
    return block_size


def num_blocks(length: int, block_size: int) -> int:
    """ceil(length / block_size): the last block may be a partial tail."""
    return -(-length // block_size)


def block_lengths(length: int, block_size: int, *, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """[num_blocks(length, block_size)]: the tokens in each block (block_size, the tail fewer)."""
    starts = torch.arange(0, length, block_size, device=device)
    return (length - starts).clamp(max=block_size).to(dtype)


@dataclass(frozen=True)
class BlockSparseMask:
    """Per (batch, head, query block) list of key blocks to visit; see the module docstring.

    ``check`` (default True) validates the contents on construction (``validate``); pass False
    only for tables built to the contract (it then costs no host synchronisation). The tensors
    are not copied: changing them afterwards is not checked again.
    """

    counts: torch.Tensor
    indices: torch.Tensor
    q_len: int
    kv_len: int
    block_size: int = 128
    check: InitVar[bool] = True

    def __post_init__(self, check: bool) -> None:
        check_block_size(self.block_size)
        for name in ("q_len", "kv_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"BlockSparseMask.{name} must be an int, got {type(value).__name__}")
        for name in ("counts", "indices"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"BlockSparseMask.{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype != torch.int32:
                raise TypeError(f"BlockSparseMask.{name} must be int32, got {t.dtype}")
        if self.counts.dim() != 3:
            raise ValueError(
                f"BlockSparseMask.counts must be [B, H, q_blocks], got shape {tuple(self.counts.shape)}"
            )
        if self.indices.dim() != 4 or self.indices.shape[:3] != self.counts.shape:
            raise ValueError(
                "BlockSparseMask.indices must be [B, H, q_blocks, width] with the leading dims of "
                f"counts {tuple(self.counts.shape)}, got {tuple(self.indices.shape)}"
            )
        if self.indices.device != self.counts.device:
            raise ValueError(
                f"BlockSparseMask.indices is on {self.indices.device} but counts on {self.counts.device}"
            )
        if self.q_len < 1 or self.kv_len < 1:
            raise ValueError(f"q_len and kv_len must be >= 1, got {self.q_len}, {self.kv_len}")
        if self.counts.shape[2] != self.q_blocks:
            raise ValueError(
                f"BlockSparseMask.counts has {self.counts.shape[2]} query blocks, but q_len={self.q_len} "
                f"with block_size={self.block_size} needs {self.q_blocks}"
            )
        if check:
            self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first (batch, head, row) that breaks the mask-row
        contract (module docstring). Reads one bool on the host (a device synchronisation)."""
        kb, width = self.kv_blocks, self.indices.shape[-1]
        counts = self.counts.long()
        full = counts == kb
        listed = (torch.arange(width, device=counts.device) < counts.unsqueeze(-1)) & ~full.unsqueeze(-1)
        blocks = self.indices.long()
        out_of_range = listed & ((blocks < 0) | (blocks >= kb))
        not_ascending = listed[..., 1:] & (blocks[..., 1:] <= blocks[..., :-1])
        bad_count = (counts < 0) | (counts > kb) | (~full & (counts > width))
        bad_row = bad_count | out_of_range.any(-1) | not_ascending.any(-1)
        if not bool(bad_row.any()):
            return
        b, h, row = (int(i) for i in bad_row.nonzero()[0])
        where = f"(batch {b}, head {h}, row {row})"
        count = int(counts[b, h, row])
        if bad_count[b, h, row]:
            if 0 <= count <= kb:
                raise ValueError(
                    f"BlockSparseMask.counts at {where} is {count}, more than the index table holds (width "
                    f"{width}); a row lists at most `width` blocks, or is full with count = kv_blocks = {kb}"
                )
            raise ValueError(f"BlockSparseMask.counts at {where} is {count}, outside [0, kv_blocks = {kb}]")
        row_blocks = blocks[b, h, row, :count].tolist()
        if out_of_range[b, h, row].any():
            raise ValueError(
                f"BlockSparseMask.indices at {where} lists key blocks {row_blocks}, some outside "
                f"[0, kv_blocks = {kb})"
            )
        raise ValueError(
            f"BlockSparseMask.indices at {where} lists key blocks {row_blocks}: they must be strictly "
            "ascending (sorted, no duplicates)"
        )

    @property
    def q_blocks(self) -> int:
        return num_blocks(self.q_len, self.block_size)

    @property
    def kv_blocks(self) -> int:
        return num_blocks(self.kv_len, self.block_size)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B, H, q_blocks, kv_blocks) of the dense block mask this stands for."""
        b, h, qb = self.counts.shape
        return (b, h, qb, self.kv_blocks)

    @classmethod
    def from_dense(
        cls, block_mask: torch.Tensor, *, q_len: int, kv_len: int, block_size: int = 128
    ) -> "BlockSparseMask":
        """Build from a bool [B, H, q_blocks, kv_blocks] block mask (synchronises the host once)."""
        if block_mask.dtype != torch.bool or block_mask.dim() != 4:
            raise TypeError(
                f"block_mask must be a bool [B, H, q_blocks, kv_blocks] tensor, got "
                f"{block_mask.dtype} of shape {tuple(block_mask.shape)}"
            )
        kv_blocks = num_blocks(kv_len, check_block_size(block_size))
        if block_mask.shape[3] != kv_blocks:
            raise ValueError(
                f"block_mask has {block_mask.shape[3]} key blocks, but kv_len={kv_len} with "
                f"block_size={block_size} needs {kv_blocks}"
            )
        counts = block_mask.sum(-1, dtype=torch.int32)
        sparse_counts = torch.where(counts == kv_blocks, 0, counts)
        width = int(sparse_counts.max()) if sparse_counts.numel() else 0
        # Stable sort of "not kept" puts the kept blocks first, in ascending order.
        order = torch.sort((~block_mask).to(torch.int8), dim=-1, stable=True).indices
        indices = order[..., :width].to(torch.int32).contiguous()
        return cls(counts, indices, q_len, kv_len, block_size, check=False)

    @classmethod
    def full(cls, q_len: int, kv_len: int, *, block_size: int = 128,
             device: torch.device | str = "cpu") -> "BlockSparseMask":
        """Every key block for every query block (dense attention), for one batch item and head
        (broadcast over both); stores no index entries."""
        q_blocks = num_blocks(q_len, check_block_size(block_size))
        counts = torch.full((1, 1, q_blocks), num_blocks(kv_len, block_size), dtype=torch.int32, device=device)
        return cls(counts, counts.new_empty(1, 1, q_blocks, 0), q_len, kv_len, block_size, check=False)

    def to_dense(self) -> torch.Tensor:
        """bool [B, H, q_blocks, kv_blocks]."""
        b, h, qb, kb = self.shape
        width = self.indices.shape[-1]
        slot = torch.arange(width, device=self.counts.device)
        counts = self.counts.unsqueeze(-1).long()
        valid = (slot < counts) & (counts != kb)  # full rows read no entries
        target = torch.where(valid, self.indices.long(), kb)
        dense = torch.zeros(b, h, qb, kb + 1, dtype=torch.bool, device=self.counts.device)
        dense.scatter_(-1, target, True)
        return dense[..., :kb] | (self.counts == kb).unsqueeze(-1)

    def full_indices(self) -> torch.Tensor:
        """int32 [B, H, q_blocks, kv_blocks]: the index table with full rows written out
        (what FlexAttention and FlashAttention-4 take)."""
        kb = self.kv_blocks
        width = self.indices.shape[-1]
        padded = torch.nn.functional.pad(self.indices, (0, kb - width))
        ramp = torch.arange(kb, dtype=torch.int32, device=self.counts.device)
        return torch.where((self.counts == kb).unsqueeze(-1), ramp, padded).contiguous()

    def density(self) -> torch.Tensor:
        """float32 [B, H]: fraction of the (query block, key block) pairs visited."""
        return self.counts.float().mean(-1) / self.kv_blocks

    def to_flex_block_mask(self):
        """The same mask as a ``torch.nn.attention.flex_attention.BlockMask``.

        The kept blocks are FlexAttention's *full* blocks (computed without a mask_mod); there are
        no partial blocks, but their table must have the full table's shape [B, H, q_blocks,
        kv_blocks] (compiled FlexAttention reads both with one stride: a narrower one gives wrong
        outputs on CUDA). The mask_mod reproduces the block mask for FlexAttention's eager path.
        """
        from torch.nn.attention.flex_attention import BlockMask

        dense = self.to_dense()
        bs = self.block_size
        batch_step, head_step = int(dense.shape[0] > 1), int(dense.shape[1] > 1)  # 0: broadcast

        def keep_block(b, h, q_idx, kv_idx):
            return dense[b * batch_step, h * head_step, q_idx // bs, kv_idx // bs]

        full_indices = self.full_indices()
        return BlockMask.from_kv_blocks(
            torch.zeros_like(self.counts),
            torch.zeros_like(full_indices),
            self.counts.contiguous(),
            full_indices,
            BLOCK_SIZE=bs,
            mask_mod=keep_block,
            seq_lengths=(self.q_len, self.kv_len),
        )

    def expand(self, batch: int, heads: int) -> "BlockSparseMask":
        """Broadcast a mask with batch or heads of size 1 to (batch, heads), without copies."""
        b, h, qb = self.counts.shape
        if b not in (1, batch) or h not in (1, heads):
            raise ValueError(
                f"block_mask has batch x heads = {b} x {h}, expected {batch} x {heads} "
                "(or 1 in either to broadcast)"
            )
        if (b, h) == (batch, heads):
            return self
        width = self.indices.shape[-1]
        return BlockSparseMask(
            self.counts.expand(batch, heads, qb),
            self.indices.expand(batch, heads, qb, width),
            self.q_len,
            self.kv_len,
            self.block_size,
            check=False,
        )


def check_block_mask(mask: object, query: torch.Tensor, key: torch.Tensor, name: str = "block_mask") -> BlockSparseMask:
    """The mask for these query/key tensors, broadcast to their (B, H)."""
    if not isinstance(mask, BlockSparseMask):
        raise TypeError(f"{name} must be a BlockSparseMask, got {type(mask).__name__}")
    n_q, n_k = query.shape[2], key.shape[2]
    if (mask.q_len, mask.kv_len) != (n_q, n_k):
        raise ValueError(f"{name} is for q_len x kv_len = {mask.q_len} x {mask.kv_len}, but query/key have "
                         f"{n_q} x {n_k} tokens")
    if mask.counts.device != query.device:
        raise ValueError(f"{name} is on {mask.counts.device}, but query is on {query.device}")
    return mask.expand(query.shape[0], query.shape[1])


def key_padding_mask(kv_valid_len: torch.Tensor, kv_len: int) -> torch.Tensor:
    """bool [B, 1, 1, kv_len]: True for the keys before ``kv_valid_len[b]`` (int [B])."""
    keys = torch.arange(kv_len, device=kv_valid_len.device)
    return keys < kv_valid_len.view(-1, 1, 1, 1)
