"""The request schema of `POST /v1/chat/completions` (OpenAI's; fields we do not know are ignored, fields of OpenAI's we
do not implement are refused: `unsupported_fields`) and the error every failure answers with, in OpenAI's shape
{"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def error_response(status: int, message: str, type: str = "invalid_request_error", param=None, code=None):
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}},
                        status_code=status)


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Lenient):
    url: str
    detail: Literal["low", "high", "auto"] = "auto"


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ImagePart(_Lenient):
    type: Literal["image_url"]
    image_url: str | ImageURL


class VideoFrames(_Lenient):
    frames: list[str | ImageURL] | None = Field(default=None, min_length=1)  # image URLs (http(s) or data:), in order
    url: str | None = None  # or a video file (http(s) or data:video/...), sampled uniformly
    num_frames: int = Field(default=8, ge=1)  # the file's frames to sample
    fps: float | None = Field(default=None, gt=0)  # or one frame every 1 / fps seconds (at most num_frames)

    @model_validator(mode="after")
    def one_source(self):
        if (self.frames is None) == (self.url is None):
            raise ValueError("a video takes exactly one of `frames` (image URLs) and `url` (a video file)")
        return self


class VideoPart(_Lenient):
    """Our request extension (OpenAI has none for video; GPT-4V's guidance is to send sampled frames as images): a
    group of frames that is one video, `{"type": "video", "video": {"frames": [url, ...]}}`, or a video file,
    `{"type": "video", "video": {"url": "data:video/mp4;base64,...", "num_frames": 8}}` (FFmpeg through PyAV, frames
    sampled uniformly). Each frame is a low-detail view; the model sees the frames' order (with
    `model.video.temporal_embeddings`)."""

    type: Literal["video"]
    video: VideoFrames


Part = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class Message(_Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part] | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False


# OpenAI request fields this server does not implement, each with the values that mean "not used" (what a client may
# send without asking for the feature). Any other value is refused with a 400 naming the field, rather than silently
# ignored: GPT-4V itself refused `tools` and `response_format` (the seeds).
UNSUPPORTED_FIELDS: dict[str, tuple] = {
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "parallel_tool_calls": (None,), "response_format": (None, {"type": "text"}), "logprobs": (None, False),
    "top_logprobs": (None, 0), "logit_bias": (None, {}), "audio": (None,), "modalities": (None, ["text"]),
    "prediction": (None,), "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
}


def unsupported_fields(req: BaseModel) -> list[str]:
    """The fields of `req` (sent by the client) that ask for a feature this server does not have."""
    sent = req.model_extra or {}
    return [name for name, unused in UNSUPPORTED_FIELDS.items() if name in sent and sent[name] not in unused]


class ChatRequest(_Lenient):
    model_config = ConfigDict(extra="allow")  # kept, so that `unsupported_fields` sees what was asked

    messages: list[Message] = Field(min_length=1)
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
