"""Held-out evaluation of composed models (`vlmtrain.train.evaluate.evaluate`): the batch's images go through tower +
connector once (`VLM.encode_images`) and are reused for generation and for every multiple-choice answer; the
metrics must equal scoring each choice on its own with the images given as pixels (the plain forward), worked
out in the test."""

from __future__ import annotations

from conftest import tiny_bundle


def _by_hand(bundle, shards, n):
    """VQA exact match, mc accuracy and the reference's mean NLL with one forward per (record, choice), images as
    pixel values: the model's ordinary `forward` / `generate`, no shared image features."""
    from vlmtrain.data.batching import collate
    from vlmtrain.data.chat import encode_messages
    from vlmtrain.data.encode import encoder_for
    from vlmtrain.data.loader import ShardLoader
    from vlmtrain.data.schema import text as text_part
    from vlmtrain.train.dpo import sequence_logps
    from vlmtrain.train.evaluate import _left_pad, _prompt_ids, _split, normalize_answer

    m, tok = bundle.model, bundle.tokenizer
    loader = ShardLoader(str(shards), encoder_for(bundle), tok.pad_token_id, batch_size=1, num_workers=0, epochs=1,
                         shuffle_buffer=1, keep_raw=True, max_bad_fraction=1.0, rank=0, world_size=1)
    exact = right = 0
    nll = []
    for k, batch in enumerate(loader):
        if k == n:
            break
        (r,) = batch["records"]
        pix = batch["pixel_values"]
        prompt, answer = _split(r)
        ids, att = _left_pad([_prompt_ids(tok, prompt, m.image_token_id, m.num_image_tokens)], tok.pad_token_id)
        out = tok.batch_decode(m.generate(ids, pix, attention_mask=att, max_new_tokens=8), skip_special_tokens=True)
        exact += normalize_answer(out[0]) == normalize_answer(answer)
        seqs = []
        for c in r["meta"]["choices"]:
            e = encode_messages(tok, list(prompt) + [{"role": "assistant", "content": [text_part(c)]}],
                                m.image_token_id, m.num_image_tokens)
            seqs.append({"input_ids": e.input_ids, "labels": e.labels, "pixel_values": pix})
        b = collate(seqs, tok.pad_token_id)  # each choice carries the record's pixels: the tower runs per choice
        logps, n_tok = sequence_logps(m(b["input_ids"], b["pixel_values"], b["attention_mask"]).logits, b["labels"])
        scores = [(float(lp), int(nt)) for lp, nt in zip(logps, n_tok)]
        best = max(range(len(scores)), key=lambda i: scores[i][0])
        right += r["meta"]["choices"][best] == answer
        i = r["meta"]["choices"].index(answer)
        nll.append(-scores[i][0] / scores[i][1])
    return {"vqa_exact_match": exact / n, "mc_accuracy": right / n, "answer_nll": sum(nll) / n}


def test_shared_image_features_give_the_same_metrics_as_scoring_each_choice_alone(tmp_path):
    from vlmtrain.data.builtin import prepare_builtin
    from vlmtrain.train.evaluate import evaluate

    bundle = tiny_bundle()
    bundle.model.eval()
    shards = prepare_builtin("digits-eval", tmp_path)
    n = 5
    got = evaluate(bundle, str(shards), max_samples=n, batch_size=3)  # 2 batches: 3 and 2 records
    want = _by_hand(bundle, shards, n)
    assert got["eval_samples"] == n
    assert got["vqa_exact_match"] == want["vqa_exact_match"] and got["mc_accuracy"] == want["mc_accuracy"]
    assert abs(got["answer_nll"] - want["answer_nll"]) < 1e-5, (got, want)
