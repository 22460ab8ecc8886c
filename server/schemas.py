"""Request and response bodies (they are also the OpenAPI schema at /docs)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictStr

# A pair is written as a two-element list or an object; a top-level list of strings is a batch of single
# texts (as in text-embeddings-inference), so ["a", "b"] means two inputs, [["a", "b"]] one pair.
Text = Annotated[StrictStr, Field(description="one text")]
PairList = Annotated[list[StrictStr], Field(min_length=2, max_length=2, description="[text, text_pair]")]


class TextPair(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: StrictStr
    text_pair: StrictStr


ClassifyInput = Text | PairList | TextPair


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"inputs": "a gorgeous, witty movie"}]})

    inputs: Text | TextPair | list[ClassifyInput] = Field(
        description='a text, a {"text", "text_pair"} pair, or a list of texts / [text, text_pair] / pairs'
    )
    model: StrictStr | None = Field(None, description="which loaded model (default: the only classifier)")
    truncate: bool = Field(True, description="cut over-long inputs to the model's limit (else 413)")
    top_k: int = Field(1, ge=1, le=1000, description="best labels to return (clipped to the number of labels)")
    all_scores: bool = Field(False, description="return every label's score")
    raw_scores: bool = Field(False, description="logits instead of probabilities")


class LabelScore(BaseModel):
    label: str
    score: float


class ClassifyResult(BaseModel):
    label: str | None = Field(None, description="best label (classification)")
    score: float | None = Field(None, description="its probability (or logit with raw_scores)")
    value: float | None = Field(None, description="the predicted value (regression models)")
    labels: list[LabelScore] | None = Field(None, description="top_k > 1 or all_scores: labels, best first")


class Usage(BaseModel):
    inputs: int
    input_tokens: int = Field(description="tokens the model ran (after truncation; QA: all windows)")
    windows: int | None = Field(None, description="QA: windows the contexts were split into")


class ClassifyResponse(BaseModel):
    model: str
    results: list[ClassifyResult]
    usage: Usage


class QAPair(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: StrictStr
    context: StrictStr


class QARequest(BaseModel):
    """Either `question` + `context`, or `inputs`: a list of {question, context}. Options as in
    transformers' question-answering pipeline."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"question": "Who wrote it?", "context": "It was written by Ada."}]},
    )

    question: StrictStr | None = None
    context: StrictStr | None = None
    inputs: list[QAPair] | None = None
    model: StrictStr | None = None
    top_k: int = Field(1, ge=1, le=100)
    doc_stride: int = Field(128, ge=0, le=4096)
    max_answer_len: int = Field(15, ge=1, le=4096)
    max_seq_len: int | None = Field(None, ge=16, le=4096, description="default: min(384, the model's limit)")
    max_question_len: int = Field(64, ge=1, le=4096)
    handle_impossible_answer: bool = False


class Answer(BaseModel):
    answer: str
    score: float
    start: int = Field(description="character offset into the context")
    end: int = Field(description="character offset into the context (exclusive)")


class QAResult(BaseModel):
    answers: list[Answer] = Field(description="best first; top_k of them")


class QAResponse(BaseModel):
    model: str
    results: list[QAResult] = Field(description="one per question/context pair, in order")
    usage: Usage


class ModelInfo(BaseModel):
    name: str
    task: str
    labels: list[str] | None
    regression: bool
    routing: str | None
    experts: int | None
    expert_dim: int | None
    moe_layers: list[int]
    max_seq_len: int
    backend: str
    int8_matmul: str | None = Field(
        None, description="int8 ONNX Runtime: exact or saturating int8 products on this CPU (--int8-matmul); else null"
    )
    max_batch_tokens: int | None = Field(
        None, description="padded tokens per model call (set, or measured at start-up)"
    )


class ModelList(BaseModel):
    models: list[ModelInfo]


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail
