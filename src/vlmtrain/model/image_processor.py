"""Image processor for a vision tower: the pretrained one when available locally, else one derived from the config.

The PIL-backed classes are used explicitly: they need no torchvision (which this CPU stack does not carry) and give
the same numbers as transformers' defaults for CLIP/SigLIP.
"""

from __future__ import annotations

from vlmtrain.errors import VlmtrainError
from vlmtrain.model.hf_parts import has_local_weights


def build_image_processor(cfg, vision_config):
    src = cfg.image_processor.pretrained or cfg.vision.pretrained
    if src is not None and (cfg.image_processor.pretrained is not None or has_local_weights(src)):
        from transformers import AutoImageProcessor

        try:
            # trust_remote_code=False: no "run the custom code?" prompt (transformers raises ValueError instead)
            proc = AutoImageProcessor.from_pretrained(src, trust_remote_code=False, **cfg.image_processor.kwargs)
        except (OSError, ValueError) as e:
            raise VlmtrainError(f"image_processor: cannot load {src!r} ({str(e).splitlines()[0]})") from None
        return proc
    size = int(vision_config.image_size)
    mt = vision_config.model_type
    if mt.startswith("siglip"):
        from transformers import SiglipImageProcessorPil

        kw = {"size": {"height": size, "width": size}} | cfg.image_processor.kwargs
        return SiglipImageProcessorPil(**kw)
    # CLIP's recipe (resize shortest edge, centre crop, CLIP mean/std) is the default for other families too.
    from transformers import CLIPImageProcessorPil

    kw = {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}} | cfg.image_processor.kwargs
    return CLIPImageProcessorPil(**kw)
