"""transformer: the encoder-decoder Transformer, readable and verified.

from transformer import ModelConfig, Transformer
model = Transformer(ModelConfig(src_vocab_size=8000, tgt_vocab_size=8000))
"""

from .attention import KVCache, MultiHeadAttention, attention, attention_reference, causal_mask, padding_mask
from .config import DataConfig, ModelConfig, RunConfig, TrainConfig, load_run_config
from .errors import CheckpointError, ConfigError, DataError, TransformerError
from .layers import (
    FeedForward,
    LearnedPositionalEncoding,
    SinusoidalPositionalEncoding,
    TokenEmbedding,
    TransformerLayer,
)
from .model import (
    Decoder,
    DecoderCache,
    Encoder,
    Transformer,
    TransformerEncoder,
    TransformerLM,
    build_model,
    count_parameters,
)

__version__ = "0.1.0"

__all__ = [
    "KVCache",
    "MultiHeadAttention",
    "attention",
    "attention_reference",
    "causal_mask",
    "padding_mask",
    "DataConfig",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
    "load_run_config",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "TransformerError",
    "FeedForward",
    "SinusoidalPositionalEncoding",
    "LearnedPositionalEncoding",
    "TokenEmbedding",
    "TransformerLayer",
    "Decoder",
    "DecoderCache",
    "Encoder",
    "Transformer",
    "TransformerEncoder",
    "TransformerLM",
    "build_model",
    "count_parameters",
]
