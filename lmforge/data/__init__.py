"""The data pipeline of pretraining: corpus -> tokenizer -> token shards -> packed samples.

prepared = prepare_data(cfg.data, cfg.tokenizer, is_main=rank == 0)
train = build_packed(prepared.train, cfg.data)        # PackedDataset of (T,) samples
sampler = GlobalSampler(len(train), cfg.data.seed)
start, count = rank_slice(cursor, global_batch, rank, world)
batch = train.get_batch(sampler.indices(start, count))  # dict of (B, T) int64 tensors
cursor += global_batch                                  # the only data state to save
"""

from lmforge.data.builtin import builtin_documents
from lmforge.data.config import DataConfig
from lmforge.data.corpus import doc_hash, validation_mask
from lmforge.data.packing import PackedDataset, build_packed, collate, document_fields
from lmforge.data.prepare import PreparedData, prepare_data
from lmforge.data.sampler import GlobalSampler, rank_slice
from lmforge.data.shards import TokenShard

__all__ = [
    "DataConfig",
    "GlobalSampler",
    "PackedDataset",
    "PreparedData",
    "TokenShard",
    "build_packed",
    "builtin_documents",
    "collate",
    "doc_hash",
    "document_fields",
    "prepare_data",
    "rank_slice",
    "validation_mask",
]
