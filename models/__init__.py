"""Pure-torch CSC-CTRL math: CSC layers, encoder/decoder, rate reduction, the CTRL objective.
No Ray, MLflow, WebDataset or file I/O.

Builders (the only place a ModelConfig becomes modules; models/build.py):
    build_encoder(cfg) -> Encoder            f
    build_decoder(cfg, encoder) -> Decoder   g (the encoder is needed when cfg.decoder_dictionaries == "tied")
    build_models(cfg) -> (encoder, decoder)     initialised as cfg.init and cfg.decoder_bn_gamma say (models/init.py)
    create_model(name) -> (encoder, decoder)    from a named preset (models/presets.py)

cfg.layer == "conv" builds the same networks with plain (transposed) convolutions in place of the CSC
layers: the baseline of models/conv.py.
"""
from __future__ import annotations

from models.build import build_decoder, build_encoder, build_models
from models.config import ModelConfig
from models.decoder import Decoder
from models.encoder import Encoder
from models.presets import create_model, list_presets, preset_config

__all__ = [
    "Decoder",
    "Encoder",
    "ModelConfig",
    "build_decoder",
    "build_encoder",
    "build_models",
    "create_model",
    "list_presets",
    "preset_config",
]
