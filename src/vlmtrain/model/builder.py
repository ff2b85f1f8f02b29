"""Build a VLM (+ tokenizer + image processor) from a ModelConfig: one small builder per part, then composition.
`build_model` is the one entry for both kinds: a NativeModelConfig goes to `vlmtrain.model.native.build`; both
builders return a `vlmtrain.model.bundle.ModelBundle`.

`device="meta"` builds the full-size architecture with no memory and no weights (for `describe` and memory plans).
"""

from __future__ import annotations

import logging

import torch

from vlmtrain.config.model import ModelConfig
from vlmtrain.errors import ConfigError
from vlmtrain.model.bundle import ModelBundle
from vlmtrain.model.connectors import build_connector, check_connector
from vlmtrain.model.hf_parts import has_local_weights, instantiate, make_hf_config
from vlmtrain.model.tokenizer import build_tokenizer, embedding_rows
from vlmtrain.model.vision import VisionTower, count_prefix_tokens
from vlmtrain.model.vlm import VLM

log = logging.getLogger(__name__)


def vision_hf_config(cfg: ModelConfig):
    """The tower's transformers config, once it is known to be a ViT-style tower with the asked feature layer."""
    vcfg = cfg.vision
    hf_cfg = make_hf_config(vcfg, "vision", vision=True)
    for attr in ("image_size", "patch_size", "hidden_size", "num_hidden_layers"):
        if not hasattr(hf_cfg, attr):
            raise ConfigError(f"vision: {hf_cfg.model_type} has no `{attr}`; only ViT-style towers are supported")
    n = hf_cfg.num_hidden_layers
    if not -n - 1 <= vcfg.feature_layer <= n:
        raise ConfigError(f"vision.feature_layer: {vcfg.feature_layer} out of range for {n} layers (+ embeddings)")
    return hf_cfg


def build_vision(cfg: ModelConfig, load_weights: bool, hf_cfg=None) -> VisionTower:
    vcfg = cfg.vision
    hf_cfg = hf_cfg or vision_hf_config(cfg)
    module = instantiate(hf_cfg, vcfg.pretrained, load_weights, causal_lm=False, field="vision")
    grid = hf_cfg.image_size // hf_cfg.patch_size
    prefix = count_prefix_tokens(module, hf_cfg.image_size, grid * grid)
    tower = VisionTower(module, vcfg.feature_layer, vcfg.select, prefix)
    if vcfg.freeze:
        tower.requires_grad_(False)
    return tower


def build_llm(cfg: ModelConfig, vocab_rows: int | None, special_ids: dict[str, int], load_weights: bool):
    hf_cfg = make_hf_config(cfg.llm, "llm", vision=False)
    pretrained_weights = load_weights and cfg.llm.pretrained is not None
    if vocab_rows is not None and not pretrained_weights:
        hf_cfg.vocab_size = vocab_rows  # size the embedding right away instead of resizing random weights
    # Random-init LMs take their special ids from the tokenizer; pretrained ones keep theirs unless missing.
    for k, v in special_ids.items():
        if v is not None and (not pretrained_weights or getattr(hf_cfg, k, None) is None):
            setattr(hf_cfg, k, v)
    llm = instantiate(hf_cfg, cfg.llm.pretrained, load_weights, causal_lm=True, field="llm")
    if vocab_rows is not None and llm.get_input_embeddings().num_embeddings != vocab_rows:
        llm.resize_token_embeddings(vocab_rows, mean_resizing=True)
    if not pretrained_weights and getattr(llm, "generation_config", None) is not None:
        for k, v in special_ids.items():
            setattr(llm.generation_config, k, v)
    return llm


def _try_tokenizer(cfg: ModelConfig, device: str):
    """On meta, a tokenizer that is not available offline is not an error: `describe` estimates instead."""
    need_download = cfg.tokenizer.tiny_bpe_vocab is None and not has_local_weights(
        cfg.tokenizer.pretrained or cfg.llm.pretrained)
    if device == "meta" and need_download:
        return None
    return build_tokenizer(cfg)


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu", load_weights: bool = True,
                tokenizer=None) -> ModelBundle:
    """Compose vision + connector + LLM. `load_weights=False` keeps random init even when `pretrained` is set.
    A NativeModelConfig builds the native kind instead (`vlmtrain.model.native`)."""
    from vlmtrain.config.model import NativeModelConfig

    if isinstance(cfg, NativeModelConfig):
        from vlmtrain.model.native.build import build_native

        return build_native(cfg, device, load_weights)
    load_weights = load_weights and str(device) != "meta"
    # every check that needs only configs first: a bad config fails before the tokenizer and the weights are built
    vision_cfg = vision_hf_config(cfg)
    llm_hf_cfg = make_hf_config(cfg.llm, "llm", vision=False)
    check_connector(cfg.connector.name, cfg.connector.args)
    tok = tokenizer if tokenizer is not None else _try_tokenizer(cfg, str(device))
    base_vocab = int(llm_hf_cfg.vocab_size)
    if tok is not None:
        rows = embedding_rows(len(tok), base_vocab, cfg.tokenizer.pad_vocab_to_multiple_of)
        image_token_id = tok.convert_tokens_to_ids(cfg.image_token)
        special = {"pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id}
    else:
        # No tokenizer offline (meta build of a hub preset): assume the image token is appended as one new row,
        # which is what happens for Llama/Vicuna-style vocabularies (LLaVA-1.5: 32000 → 32064 rows).
        rows = embedding_rows(base_vocab + 1, base_vocab, cfg.tokenizer.pad_vocab_to_multiple_of)
        image_token_id, special = base_vocab, {}
    with torch.device(device):
        vision = build_vision(cfg, load_weights, vision_cfg)
        llm = build_llm(cfg, rows, special, load_weights)
        connector = build_connector(cfg.connector.name, vision.hidden_size, int(llm.config.hidden_size),
                                    vision.num_features, vision.grid if vision.has_grid else None, cfg.connector.args)
    model = VLM(vision, connector, llm, image_token_id)
    image_processor = None
    if tok is not None or str(device) != "meta":
        from vlmtrain.model.image_processor import build_image_processor

        image_processor = build_image_processor(cfg, vision.model.config)
    return ModelBundle(model, tok, image_processor, cfg)
