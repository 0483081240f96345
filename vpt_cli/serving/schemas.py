"""The HTTP API's request and answer shapes: what /docs shows, every field described."""
from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    code: str = Field(description="Stable machine-readable reason, e.g. 'unknown_task', 'payload_too_large'.")
    message: str = Field(description="One line for a person: what was wrong and what to do.")


class ErrorAnswer(BaseModel):
    error: ErrorBody = Field(description="Every error has this shape; never a traceback or a server path.")


class PredictJSON(BaseModel):
    images: list[str] = Field(description="Images as base64 of their encoded bytes (JPEG, PNG, WebP...); "
                                          "never URLs or paths.")
    tasks: list[str] = Field(description="One entry for all images, or one per image; an entry may name several "
                                         "tasks separated by commas ('birds,cars'), each answered for its image(s).")
    top_k: Optional[int] = Field(None, ge=1, le=100, description="Classes per image and task (fewer when a task "
                                 "has fewer); omitted: each task's own answer (single-label: its 3 best classes; multi-label: every label over its threshold).")


class Label(BaseModel):
    label: str = Field(description="Class name.")
    score: float = Field(description="Probability under the task's softmax (the same as `vpt predict`).")


class TaskAnswer(BaseModel):
    task: str = Field(description="Task name.")
    top: list[Label] = Field(description="Best classes first.")


class ImageAnswer(BaseModel):
    index: int = Field(description="Position of the image in the request (0-based).")
    filename: Optional[str] = Field(None, description="The upload's file name, when it had one (multipart).")
    answers: list[TaskAnswer] = Field(description="One entry per task asked for this image; empty on error.")
    error: Optional[ErrorBody] = Field(None, description="Why this image was not answered (e.g. undecodable); "
                                                         "the other images of the request are still answered.")


class Timing(BaseModel):
    total_ms: float = Field(description="From the request's arrival to its answer.")
    decode_ms: float = Field(description="Decoding and transforming this request's images (in a thread pool).")
    queue_ms: float = Field(description="Longest wait of one of its (image, task) pairs for a forward.")
    forward_ms: float = Field(description="Longest batched forward that answered one of its pairs.")
    batch_size: int = Field(description="Largest batch one of its pairs shared (pairs of any request and task).")


class BackboneInfo(BaseModel):
    name: str = Field(description="timm name of the shared backbone.")
    fingerprint: str = Field(description="Hash of the backbone weights every served task was trained on.")
    img_size: int = Field(description="Input size in pixels (images are resized and cropped to it).")


class PredictAnswer(BaseModel):
    results: list[ImageAnswer] = Field(description="One entry per image, in request order.")
    backbone: BackboneInfo = Field(description="The backbone that answered.")
    version: int = Field(description="Version of the served task set that answered (grows on every reload).")
    timing: Timing = Field(description="Where the time went.")


class TaskCard(BaseModel):
    name: str = Field(description="Task name (its file name in the registry).")
    classes: list[str] = Field(description="Class names, in the head's order.")
    method: str = Field(description="Prompt method, e.g. vpt-deep, vpt-shallow, linear.")
    prompts: int = Field(description="Prompt tokens per layer (0 for a linear probe).")
    created: Optional[str] = Field(None, description="When the task was trained, as its file records it.")
    sha256: str = Field(description="SHA-256 of the task file that is loaded.")


class TasksAnswer(BaseModel):
    tasks: list[TaskCard] = Field(description="Tasks served now, in model order.")
    backbone: BackboneInfo = Field(description="The one backbone they share.")
    version: int = Field(description="Version of the served task set.")


class ReloadAnswer(BaseModel):
    task: TaskCard = Field(description="The task as now loaded.")
    version: int = Field(description="Version of the served task set after the change.")


class UnloadAnswer(BaseModel):
    unloaded: str = Field(description="The task no longer served (its file is left as it is).")
    version: int = Field(description="Version of the served task set after the change.")


class Live(BaseModel):
    live: bool = Field(description="The process answers.")


class Ready(BaseModel):
    ready: bool = Field(description="Weights are loaded and a warm-up forward ran (for a model: it is served).")


class TensorSpec(BaseModel):
    name: str = Field(description="Tensor name.")
    datatype: str = Field(description="Open inference protocol datatype (BYTES, FP32...).")
    shape: list[int] = Field(description="Shape; -1 for a variable size.")


class ModelMetadata(BaseModel):
    name: str = Field(description="Task name.")
    versions: list[str] = Field(description="The loaded file's SHA-256, shortened.")
    platform: str = Field(description="Always 'vpt-cli'.")
    inputs: list[TensorSpec] = Field(description="One BYTES input: encoded images.")
    outputs: list[TensorSpec] = Field(description="label (BYTES) and score (FP32), each [images, k].")


class ModelList(BaseModel):
    models: list[str] = Field(description="Names of the served tasks (the v2 'models').")


class InferInput(BaseModel):
    name: str = Field(description="Input name; any, the first BYTES input is read.")
    shape: list[int] = Field(description="[number of images].")
    datatype: str = Field(description="Must be BYTES.")
    data: list[str] = Field(description="Each image's encoded bytes as base64.")


class InferRequest(BaseModel):
    id: Optional[str] = Field(None, max_length=128, description="Echoed back in the answer.")
    inputs: list[InferInput] = Field(description="Exactly one BYTES input holding the images.")
    parameters: Optional[dict[str, int]] = Field(None, description="Optional {'top_k': k} (default 5).")


class InferOutput(BaseModel):
    name: str = Field(description="'label' or 'score'.")
    shape: list[int] = Field(description="[images, k].")
    datatype: str = Field(description="BYTES for labels, FP32 for scores.")
    data: list = Field(description="Row-major values.")


class InferAnswer(BaseModel):
    model_name: str = Field(description="The task that answered.")
    model_version: str = Field(description="Its file's SHA-256, shortened.")
    id: Optional[str] = Field(None, description="The request's id.")
    outputs: list[InferOutput] = Field(description="label and score, best first per image.")
