"""Schemas of the two model kinds.

- A composed VLM (`ModelConfig`): `vision` + `connector` + `llm` (+ tokenizer and image processor).
- A native transformers VLM (`NativeModelConfig`): any image-text-to-text checkpoint (`pretrained:`), or a
  `model_type` + config fields for an architecture built offline (random weights, or `meta` for counting).

Each part is either a `pretrained` HF id/local path (real weights, loaded when present) or an inline HF `config`
dict (architecture only: random weights, or the `meta` device for counting). Both may be given: the inline config
then fixes the architecture offline while `pretrained` says where real weights live.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator


class _Strict(BaseModel):
    # Unknown keys are errors: a typo like `feature_layr` must not be silently ignored.
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class _HFPart(_Strict):
    pretrained: str | None = Field(None, description="HF hub id or local folder holding config + weights")
    config: dict[str, Any] | None = Field(
        None, description="inline HF config kwargs; must include model_type (aliases: clip, siglip)"
    )

    @model_validator(mode="after")
    def _one_source(self):
        if self.pretrained is None and self.config is None:
            raise ValueError("give `pretrained` (HF id or path) or an inline `config` with a model_type")
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("inline `config` needs a `model_type` (e.g. clip_vision_model, siglip_vision_model, llama)")
        return self


class VisionConfig(_HFPart):
    feature_layer: int = Field(-2, description="hidden-state index fed to the connector (LLaVA uses -2)")
    select: Literal["drop_cls", "all"] = Field(
        "drop_cls", description="drop_cls: patch tokens only (LLaVA 'default'); all: keep every token ('full')"
    )
    freeze: bool = Field(True, description="default trainability; a stage may override it")


class ConnectorConfig(_Strict):
    name: str = Field(description="registry id: linear, mlp2x_gelu, pixel_shuffle, ldp, ...")
    args: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the connector")


class LLMConfig(_HFPart):
    """Any transformers causal LM: `pretrained` and/or an inline `config` (e.g. model_type llama, qwen2, gemma)."""


class TokenizerConfig(_Strict):
    pretrained: str | None = Field(None, description="HF id/path; defaults to llm.pretrained")
    tiny_bpe_vocab: int | None = Field(
        None, ge=300, description="build a byte-level BPE of this size offline (tiny/test models)"
    )
    chat_template: str | None = Field(
        None, description="template name (vlmtrain_tiny, chatml, llava_v1) or a Jinja string; default: the tokenizer's"
    )
    pad_vocab_to_multiple_of: int = Field(64, ge=1, description="embedding rows are padded to this multiple")


class ImageProcessorConfig(_Strict):
    pretrained: str | None = Field(None, description="HF id/path; defaults to vision.pretrained")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="overrides passed to the processor class")


class ModelConfig(_Strict):
    name: str = "vlm"
    vision: VisionConfig
    connector: ConnectorConfig
    llm: LLMConfig
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    image_processor: ImageProcessorConfig = Field(default_factory=ImageProcessorConfig)
    image_token: str = "<image>"

    @model_validator(mode="after")
    def _tokenizer_source(self):
        if self.tokenizer.pretrained is None and self.tokenizer.tiny_bpe_vocab is None and self.llm.pretrained is None:
            raise ValueError("no tokenizer: set tokenizer.pretrained, tokenizer.tiny_bpe_vocab, or llm.pretrained")
        return self


class NativeModelConfig(_Strict):
    """A transformers image-text-to-text model (Qwen2.5-VL, Gemma 3, Idefics3/SmolVLM, LLaVA-OneVision, ...),
    loaded with `AutoModelForImageTextToText` + `AutoProcessor`. Its own processor decides the image tokens."""

    name: str = "vlm"
    pretrained: str | None = Field(None, description="HF hub id or local folder (model + processor files)")
    model_type: str | None = Field(None, description="transformers model_type (e.g. qwen2_5_vl, gemma3); "
                                   "read from the checkpoint when `pretrained` is given")
    config: dict[str, Any] | None = Field(
        None, description="HF config fields fixing the architecture offline (nested text_config/vision_config)")
    processor: dict[str, Any] = Field(
        default_factory=dict, description="processor overrides, e.g. {max_pixels: 1003520} for Qwen2.5-VL")
    chat_template: str | None = Field(
        None, description="a Jinja template with {% generation %} marks; default: vlmtrain's marked copy of the "
                          "family's official template")

    @model_validator(mode="after")
    def _source(self):
        if self.pretrained is None and (self.model_type is None or self.config is None):
            raise ValueError("give `pretrained` (checkpoint folder or id) or `model_type` with `config`")
        return self


COMPOSED_KEYS = ("vision", "connector", "llm")


def is_native_config(data) -> bool:
    """A model mapping is native unless it names composed parts (`vision`, `connector`, `llm`)."""
    if isinstance(data, NativeModelConfig):
        return True
    if isinstance(data, ModelConfig):
        return False
    return isinstance(data, dict) and not any(k in data for k in COMPOSED_KEYS)


def _model_kind(data) -> str | None:
    if isinstance(data, str) or data is None:
        return None
    return "native" if is_native_config(data) else "composed"


# A stage's inline `model:`: the kind is decided by the keys, so errors name the fields of that kind only.
AnyModelConfig = Annotated[
    Union[Annotated[ModelConfig, Tag("composed")], Annotated[NativeModelConfig, Tag("native")]],
    Discriminator(_model_kind),
]
