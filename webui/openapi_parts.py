"""Building blocks of the OpenAPI document: schema helpers, error answers, operations."""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]


def ref(name: str) -> Schema:
    """A reference to a schema under components/schemas."""
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: Schema) -> Schema:
    """The schema or null."""
    return {"anyOf": [schema, {"type": "null"}]}


def obj(properties: dict[str, Schema], optional: tuple[str, ...] = (), description: str | None = None) -> Schema:
    """A closed object: every property required unless named optional, no others allowed."""
    schema: Schema = {"type": "object"}
    if description:
        schema["description"] = description
    schema["properties"] = properties
    schema["required"] = [name for name in properties if name not in optional]
    schema["additionalProperties"] = False
    return schema


def string(description: str, **extra: Any) -> Schema:
    """A described string."""
    return {"type": "string", "description": description, **extra}


def integer(description: str, minimum: int | None = 0, **extra: Any) -> Schema:
    """A described integer, by default non-negative."""
    schema: Schema = {"type": "integer", "description": description, **extra}
    if minimum is not None:
        schema["minimum"] = minimum
    return schema


def number(description: str, **extra: Any) -> Schema:
    """A described number."""
    return {"type": "number", "description": description, **extra}


def array(items: Schema, description: str, **extra: Any) -> Schema:
    """A described array."""
    return {"type": "array", "description": description, "items": items, **extra}


# --- responses -----------------------------------------------------------------------------------

ERROR_MEANINGS = {
    400: "A bad parameter, a malformed query, an unknown image or label, or an upload that is not an image.",
    401: "The server has an access token and the request did not present it.",
    404: "No such image id (or not a whole number).",
    409: "The library has no indexed images yet, or its vectors come from another model.",
    413: "The request body (the upload) is larger than the server's `max_upload_mb`, or a form field is too large.",
    403: "A page of another site tried to change the library (changes come from clipsearch's pages or API clients).",
    500: "An unexpected failure (details in the server log).",
    503: "The library is busy (being rebuilt), cannot be opened, or the model weights are unavailable.",
}


def json_content(schema: Schema) -> dict[str, Any]:
    """A JSON media type with that schema."""
    return {"application/json": {"schema": schema}}


def error_responses(*codes: int) -> dict[str, Any]:
    """The error answers of the given statuses plus those any call can get (401, 500)."""
    answers: dict[str, Any] = {}
    for code in sorted({401, 500, *codes}):
        answer: dict[str, Any] = {"description": ERROR_MEANINGS[code], "content": json_content(ref("Error"))}
        if code == 401:
            challenge = {"description": 'Bearer realm="clipsearch"', "schema": {"type": "string"}}
            answer["headers"] = {"WWW-Authenticate": challenge}
        answers[str(code)] = answer
    return answers


def responses(ok: Schema, description: str, *errors: int) -> dict[str, Any]:
    """A 200 answer with that schema, plus the error answers."""
    return {"200": {"description": description, "content": json_content(ok)}, **error_responses(*errors)}


def operation(op_id: str, tag: str, summary: str, description: str, answers: dict[str, Any],
              parameters: list[Schema] | None = None, body: Schema | None = None) -> Schema:
    """One operation of the API."""
    op: Schema = {"operationId": op_id, "tags": [tag], "summary": summary, "description": description}
    if parameters:
        op["parameters"] = parameters
    if body:
        op["requestBody"] = body
    op["responses"] = answers
    return op
