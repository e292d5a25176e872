"""A stand-in model behind the metering guard: what ``meterkit serve --demo-model`` adds.

``POST /v1/chat/completions`` answers a short canned chat completion in the OpenAI shape (the
official SDK's ``client.chat.completions.create`` parses it) and records its tokens as a
``completions`` event of the caller's organization, so the price book prices it into the
month's spend. Every request to it goes through :class:`~meterkit.asgi.MeteringMiddleware`:
rate limits, plan quotas and the spend limit refuse it with a 429 in the OpenAI error shape
(``insufficient_quota`` once the hard spend limit is reached). Every other path goes to the
app it wraps (meterkit's own endpoints, which are never refused).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import anyio.to_thread

from meterkit.asgi import MeteringMiddleware, MeteringOptions, current_usage
from meterkit.ids import new_id

if TYPE_CHECKING:
    from meterkit.asgi import ASGIApp, Receive, Scope, Send
    from meterkit.meter import Meter

__all__ = ["PATH", "DemoModel", "guarded"]

PATH = "/v1/chat/completions"
REPLY = "This is meterkit's demo model: the tokens of this answer were metered and priced."
MAX_BODY = 1024 * 1024


def _tokens(text: str) -> int:
    # About four characters a token, as OpenAI's rule of thumb has it.
    return max(1, (len(text) + 3) // 4)


def _prompt_text(messages: object) -> str:
    if not isinstance(messages, list):
        return ""
    parts = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            parts.append(content)
    return "\n".join(parts)


class DemoModel:
    """The ASGI app: the demo model at :data:`PATH`, everything else to ``app``."""

    def __init__(self, app: ASGIApp, meter: Meter) -> None:
        self.app = app  # followed by the guard to find meterkit's own endpoints
        self.meter = meter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") != PATH:
            await self.app(scope, receive, send)
            return
        if scope.get("method") != "POST":
            await _json(send, 405, _error("Use POST.", "method_not_allowed"))
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if len(body) > MAX_BODY:
                await _json(send, 413, _error("The body is too large.", "body_too_large"))
                return
            if not message.get("more_body"):
                break
        try:
            request = json.loads(body or b"{}")
        except ValueError:
            await _json(send, 400, _error("The body is not valid JSON.", "invalid_body"))
            return
        model = request.get("model") if isinstance(request, dict) else None
        if not isinstance(model, str) or not model or len(model) > 200:
            await _json(send, 400, _error("model is required.", "invalid_value", "model"))
            return
        org = current_usage().organization_id
        if org is None:
            await _json(send, 401, _error("An API key is required.", "missing_api_key"))
            return
        prompt = _tokens(_prompt_text(request.get("messages")))
        completion = _tokens(REPLY)
        reply_id = new_id("chatcmpl")

        def record() -> None:
            self.meter.record(
                "completions",
                {
                    # The text parts too: prices may be set per part (the demo's are).
                    "input_tokens": prompt,
                    "input_text_tokens": prompt,
                    "output_tokens": completion,
                    "output_text_tokens": completion,
                    "num_model_requests": 1,
                },
                organization_id=org,
                id=reply_id,
                dimensions={"model": model},
            )

        await anyio.to_thread.run_sync(record)
        await _json(
            send,
            200,
            {
                "id": reply_id,
                "object": "chat.completion",
                "created": self.meter.now(),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": REPLY, "refusal": None},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "total_tokens": prompt + completion,
                },
            },
        )


def _error(message: str, code: str, param: str | None = None) -> dict[str, Any]:
    return {
        "error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}
    }


async def _json(send: Send, status: int, data: dict[str, Any]) -> None:
    body = json.dumps(data).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


def guarded(app: ASGIApp, meter: Meter, options: MeteringOptions[Scope] | None = None) -> ASGIApp:
    """``app`` with the demo model in front, both behind the metering guard with ``options``
    (which never meters meterkit's own endpoints: it finds them through ``DemoModel.app``)."""
    return MeteringMiddleware(DemoModel(app, meter), meter=meter, options=options)
