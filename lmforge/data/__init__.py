"""The data pipeline of pretraining: corpus -> tokenizer -> token shards -> packed samples.

prepared = prepare_data(cfg.data, cfg.tokenizer, is_main=rank == 0)
train = build_packed(prepared.train, cfg.data)        # PackedDataset of (T,) samples
sampler = GlobalSampler(len(train), cfg.data.seed)
start, count = rank_slice(cursor, global_batch, rank, world)
batch = train.get_batch(sampler.indices(start, count))  # dict of (B, T) int64 tensors
cursor += global_batch                                  # the only data state to save

Finetuning (chat.py, chat_datasets.py, tasks.py):

train, heldout_records = load_sft_data(cfg.data, tokenizer)    # SFTDataset, list of chats
prompts = PromptDataset(heldout_records, tokenizer, seq_len)    # exact-match evaluation
train, heldout = load_preference_data(cfg.data, tokenizer)     # PreferenceDataset x 2
"""

from lmforge.data.builtin import builtin_documents
from lmforge.data.chat import ChatDataConfig, load_preference_data, load_sft_data
from lmforge.data.chat_datasets import PreferenceDataset, PromptDataset, SFTDataset
from lmforge.data.config import DataConfig
from lmforge.data.corpus import doc_hash, validation_mask
from lmforge.data.packing import PackedDataset, build_packed, collate, document_fields
from lmforge.data.prepare import PreparedData, prepare_data
from lmforge.data.sampler import GlobalSampler, rank_slice
from lmforge.data.shards import TokenShard
from lmforge.data.tasks import TASKS, check_answer, preference_pairs, task_examples

__all__ = [
    "TASKS",
    "ChatDataConfig",
    "DataConfig",
    "GlobalSampler",
    "PackedDataset",
    "PreferenceDataset",
    "PreparedData",
    "PromptDataset",
    "SFTDataset",
    "TokenShard",
    "build_packed",
    "builtin_documents",
    "check_answer",
    "collate",
    "doc_hash",
    "document_fields",
    "load_preference_data",
    "load_sft_data",
    "preference_pairs",
    "prepare_data",
    "rank_slice",
    "task_examples",
    "validation_mask",
]
