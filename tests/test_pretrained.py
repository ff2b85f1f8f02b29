"""Parts given as `pretrained` local folders load their real weights (what users with downloaded checkpoints do)."""

import torch
import yaml

from vlmtrain.config import load_model_config
from vlmtrain.model import build_model


def test_local_pretrained_parts_load_their_weights(tmp_path, tiny):
    src = tiny.model
    src.vision.model.save_pretrained(tmp_path / "vision")
    src.llm.save_pretrained(tmp_path / "llm")
    tiny.tokenizer.save_pretrained(tmp_path / "llm")
    tiny.image_processor.save_pretrained(tmp_path / "vision")
    cfg = {
        "name": "from-folders",
        "vision": {"pretrained": str(tmp_path / "vision"), "feature_layer": -2, "select": "drop_cls"},
        "connector": {"name": "mlp2x_gelu"},
        "llm": {"pretrained": str(tmp_path / "llm")},
    }
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(cfg))
    b = build_model(load_model_config(tmp_path / "m.yaml"))
    for mine, theirs in ((b.model.vision.model, src.vision.model), (b.model.llm, src.llm)):
        for (k, v), (k2, v2) in zip(mine.state_dict().items(), theirs.state_dict().items()):
            assert k == k2 and torch.equal(v, v2), k
    assert b.tokenizer.get_vocab() == tiny.tokenizer.get_vocab()
    assert b.model.image_token_id == src.image_token_id
    assert b.image_processor.to_dict()["crop_size"] == tiny.image_processor.to_dict()["crop_size"]
    # the same folders with load_weights=False give the same shapes but fresh random weights
    r = build_model(load_model_config(tmp_path / "m.yaml"), load_weights=False)
    assert not torch.equal(r.model.llm.lm_head.weight, src.llm.lm_head.weight)
