"""The builders: the only place a ModelConfig becomes modules (re-exported by the ``models`` package)."""
from __future__ import annotations

from models.config import ModelConfig
from models.decoder import Decoder
from models.encoder import Encoder
from models.init import init_models_


def build_encoder(cfg: ModelConfig) -> Encoder:
    """The encoder f of ``cfg``."""
    return Encoder(cfg)


def build_decoder(cfg: ModelConfig, encoder: Encoder | None = None) -> Decoder:
    """The decoder g of ``cfg``; a tied decoder synthesises with ``encoder``'s dictionaries."""
    return Decoder(cfg, encoder)


def build_models(cfg: ModelConfig) -> tuple[Encoder, Decoder]:
    """(encoder, decoder) of ``cfg``, tied through the encoder's dictionaries when the config says so."""
    encoder = build_encoder(cfg)
    decoder = build_decoder(cfg, encoder)
    init_models_(encoder, decoder, cfg)
    return encoder, decoder
