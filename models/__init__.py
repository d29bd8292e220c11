"""Pure-torch CSC-CTRL math: CSC layers, encoder/decoder, rate reduction, the CTRL objective.
No Ray, MLflow, WebDataset or file I/O.

Builders (the only place a ModelConfig becomes modules):
    build_encoder(cfg) -> CSCEncoder            f
    build_decoder(cfg, encoder) -> CSCDecoder   g (the encoder is needed when cfg.decoder_dictionaries == "tied")
    build_models(cfg) -> (encoder, decoder)     initialised as cfg.init and cfg.decoder_bn_gamma say (models/init.py)
    create_model(name) -> (encoder, decoder)    from a named preset (models/presets.py)

cfg.layer == "conv" builds the same networks with plain (transposed) convolutions in place of the CSC
layers: the baseline of models/conv.py.
"""
from __future__ import annotations

from models.config import ModelConfig
from models.decoder import CSCDecoder
from models.encoder import CSCEncoder
from models.init import init_models_


def build_encoder(cfg: ModelConfig) -> CSCEncoder:
    """The encoder f of ``cfg``."""
    return CSCEncoder(cfg)


def build_decoder(cfg: ModelConfig, encoder: CSCEncoder | None = None) -> CSCDecoder:
    """The decoder g of ``cfg``; a tied decoder synthesises with ``encoder``'s dictionaries."""
    return CSCDecoder(cfg, encoder)


def build_models(cfg: ModelConfig) -> tuple[CSCEncoder, CSCDecoder]:
    """(encoder, decoder) of ``cfg``, tied through the encoder's dictionaries when the config says so."""
    encoder = build_encoder(cfg)
    decoder = build_decoder(cfg, encoder)
    init_models_(encoder, decoder, cfg)
    return encoder, decoder


from models.presets import create_model, list_presets, preset_config  # noqa: E402  (presets use the builders)

__all__ = [
    "CSCDecoder",
    "CSCEncoder",
    "ModelConfig",
    "build_decoder",
    "build_encoder",
    "build_models",
    "create_model",
    "list_presets",
    "preset_config",
]
