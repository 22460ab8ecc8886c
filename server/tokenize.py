"""POST /v1/tokenize: how a model's tokenizer splits texts (or pairs), with character offsets; the token
shape follows text-embeddings-inference's /tokenize (id, text, special, start, stop)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from server.classify import normalize_inputs
from server.errors import InvalidInput, UnknownModel
from server.handling import check_count
from server.schemas import ClassifyInput, ErrorResponse, TextPair, Usage


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"inputs": "a gorgeous, witty movie"}]})

    inputs: StrictStr | TextPair | list[ClassifyInput] = Field(
        description="a text, a {text, text_pair} pair, or a list of texts / [text, text_pair] / pairs"
    )
    model: StrictStr | None = Field(None, description="which loaded model's tokenizer (default: the only model)")
    add_special_tokens: bool = Field(True, description="add [CLS] / [SEP] as the model sees them")


class Token(BaseModel):
    id: int
    text: str
    special: bool
    sequence: int | None = Field(description="0: the text, 1: the text pair, None: special token")
    start: int | None = Field(description="character offset into its text (None for special tokens)")
    stop: int | None = Field(description="character offset into its text, exclusive")


class TokenizeResponse(BaseModel):
    model: str
    tokens: list[list[Token]] = Field(description="one list per input, in order")
    usage: Usage


def tokenize_router(state) -> APIRouter:
    router = APIRouter()

    @router.post(
        "/v1/tokenize",
        response_model=TokenizeResponse,
        responses={code: {"model": ErrorResponse} for code in (401, 404, 413, 422, 503)},
        tags=["inference"],
    )
    async def tokenize_endpoint(body: TokenizeRequest) -> Response:
        model = _pick(state.registry.models, body.model)
        items = normalize_inputs(body.inputs)
        check_count(len(items), state.settings.max_inputs, "inputs")
        out = []
        for text, pair in items:
            enc = model._whole.encode(text, pair, add_special_tokens=body.add_special_tokens)
            tokens = []
            for i, (token_id, piece, special, (start, stop)) in enumerate(
                zip(enc.ids, enc.tokens, enc.special_tokens_mask, enc.offsets, strict=True)
            ):
                seq = enc.sequence_ids[i]
                keep = not special and seq is not None
                tokens.append(Token(id=token_id, text=piece, special=bool(special), sequence=seq if keep else None,
                                    start=start if keep else None, stop=stop if keep else None))  # fmt: skip
            out.append(tokens)
        response = TokenizeResponse(
            model=model.name, tokens=out, usage=Usage(inputs=len(items), input_tokens=sum(map(len, out)))
        )
        # Token offsets stay null for special tokens; usage leaves out what does not apply, as elsewhere.
        return Response(response.model_dump_json(exclude={"usage": {"windows"}}), media_type="application/json")

    return router


def _pick(models: dict, name: str | None):
    if name is not None:
        if name not in models:
            raise UnknownModel(f"unknown model {name!r}; loaded: {', '.join(models) or 'none'}")
        return models[name]
    if len(models) != 1:
        raise InvalidInput(f"several models are loaded ({', '.join(models)}): pick one with 'model'")
    return next(iter(models.values()))
