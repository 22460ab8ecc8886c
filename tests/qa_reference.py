"""The reference for extractive QA: transformers' QuestionAnsweringPipeline of transformers 4.x
(preprocess for fast tokenizers, _forward one window at a time, postprocess), transcribed, with the
scoring core taken from transformers itself (`select_starts_ends`, which 4.x's pipeline called and
transformers 5 still ships in pipelines.document_question_answering), plus the question and contexts
the QA tests share."""

from __future__ import annotations

import numpy as np
import torch
from transformers.pipelines.document_question_answering import select_starts_ends

QUESTION = "Who designed the Eiffel Tower?"
SHORT = "The Eiffel Tower was designed by the engineering company of Gustave Eiffel."
LONG = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after "
    "the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889. Locally "
    'nicknamed "La dame de fer" (French for "Iron Lady"), it was constructed as the centrepiece of the 1889 '
    "World's Fair, and to crown the centennial anniversary of the French Revolution. Although initially "
    "criticised by some of France's leading artists and intellectuals for its design, it has since become a "
    "global cultural icon of France and one of the most recognisable structures in the world. The tower "
    "received 5,889,000 visitors in 2022. It is 330 metres tall, about the same height as an 81-storey "
    "building, and the tallest structure in Paris. Its base is square, measuring 125 metres on each side."
)
SEQ, STRIDE = 64, 16  # the tiny model has 64 positions; a long context then needs several windows


def reference_features(tokenizer, question, context, max_seq_len, doc_stride):
    """QuestionAnsweringPipeline.preprocess (4.x, fast tokenizer, right padding)."""
    enc = tokenizer(
        text=question, text_pair=context, padding="do_not_pad", truncation="only_second", max_length=max_seq_len,
        stride=doc_stride, return_token_type_ids=True, return_overflowing_tokens=True, return_offsets_mapping=True,
        return_special_tokens_mask=True,
    )  # fmt: skip
    features = []
    for span in range(len(enc["input_ids"])):
        p_mask = [tok != 1 for tok in enc.sequence_ids(span)]
        ids = enc["input_ids"][span]
        for cls_index in np.nonzero(np.array(ids) == tokenizer.cls_token_id)[0]:
            p_mask[cls_index] = 0
        features.append({
            "input_ids": ids, "attention_mask": enc["attention_mask"][span],
            "token_type_ids": enc["token_type_ids"][span], "p_mask": p_mask, "encoding": enc[span],
        })  # fmt: skip
    return features


def window_logits(model, feature) -> tuple[np.ndarray, np.ndarray]:
    """The pipeline's _forward: one window, unpadded, batch of one → start, end logits [1, n]."""
    inputs = {k: torch.tensor([feature[k]]) for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        out = model(**inputs)
    return out.start_logits.numpy(), out.end_logits.numpy()


def reference_answers(model, tokenizer, question, context, *, top_k=1, max_answer_len=15,
                      handle_impossible_answer=False, align_to_words=True):  # fmt: skip
    """QuestionAnsweringPipeline.postprocess (4.x) over its windows: (text, start, end, score) best first."""
    min_null_score = 1000000
    answers = []
    for feature in reference_features(tokenizer, question, context, SEQ, STRIDE):
        start, end = window_logits(model, feature)
        pre_topk = top_k * 2 + 10 if align_to_words else top_k
        starts, ends, scores, min_null_score = select_starts_ends(
            start, end, torch.tensor([feature["p_mask"]]), np.array([feature["attention_mask"]]), min_null_score,
            pre_topk, handle_impossible_answer, max_answer_len,
        )  # fmt: skip
        enc = feature["encoding"]
        for s, e, span_score in zip(starts, ends, scores, strict=True):
            if align_to_words:
                try:
                    start_index = enc.word_to_chars(enc.token_to_word(s), sequence_index=1)[0]
                    end_index = enc.word_to_chars(enc.token_to_word(e), sequence_index=1)[1]
                except Exception:
                    start_index, end_index = enc.offsets[s][0], enc.offsets[e][1]
            else:
                start_index, end_index = enc.offsets[s][0], enc.offsets[e][1]
            target = context[start_index:end_index]
            same = next((a for a in answers if a["answer"].lower() == target.lower()), None)
            if same:
                same["score"] += span_score.item()
            else:
                answers.append({"score": span_score.item(), "start": start_index, "end": end_index, "answer": target})
    if handle_impossible_answer:
        answers.append({"score": min_null_score, "start": 0, "end": 0, "answer": ""})
    answers = sorted(answers, key=lambda x: x["score"], reverse=True)[:top_k]
    return [(a["answer"], a["start"], a["end"], a["score"]) for a in answers]
