"""The built-in meters: the eleven OpenAI usage kinds and a handful of generic ones."""

from __future__ import annotations

from meterkit.models import Dimension, Measure, MeterSpec

__all__ = [
    "API_SOURCES",
    "CHARGES_METER",
    "CONTEXT_LEVELS",
    "GENERIC_METERS",
    "OPENAI_KINDS",
    "TOKEN_SUMS",
    "builtin_meters",
]

_PEOPLE = (Dimension("project_id"), Dimension("user_id"), Dimension("api_key_id"))
_MODEL = (*_PEOPLE, Dimension("model"))
IMAGE_SOURCES = frozenset({"image.generation", "image.edit", "image.variation"})
IMAGE_SIZES = frozenset({"256x256", "512x512", "1024x1024", "1792x1792", "1024x1792"})


def _openai(kind: str, measures: tuple[Measure, ...], dims: tuple[Dimension, ...]) -> MeterSpec:
    return MeterSpec(kind, measures, dims, result_object=f"organization.usage.{kind}.result")


def _sums(*names: str) -> tuple[Measure, ...]:
    return tuple(Measure(n) for n in names)


API_SOURCES = frozenset({"agents_api", "unlabeled"})
CONTEXT_LEVELS = frozenset({"low", "medium", "high"})
_API_SOURCE = Dimension("api_source", allowed=API_SOURCES, default="unlabeled")

# Completions and decisions: every token field of the official types, and the sums their
# descriptions document (checked when an event gives a total and all its parts).
_TOKENS = _sums(
    "input_tokens",
    "output_tokens",
    "input_cached_tokens",
    "input_audio_tokens",
    "output_audio_tokens",
    "num_model_requests",
    "input_cache_write_tokens",
    "input_cache_write_12h_tokens",
    "input_cache_write_30m_tokens",
    "input_uncached_tokens",
    "input_text_tokens",
    "input_image_tokens",
    "input_cached_text_tokens",
    "input_cached_audio_tokens",
    "input_cached_image_tokens",
    "output_text_tokens",
    "output_image_tokens",
)
TOKEN_SUMS: dict[str, tuple[str, ...]] = {
    "input_tokens": ("input_cached_tokens", "input_cache_write_tokens", "input_uncached_tokens"),
    "input_cache_write_tokens": ("input_cache_write_30m_tokens", "input_cache_write_12h_tokens"),
    "input_cached_tokens": (
        "input_cached_text_tokens",
        "input_cached_audio_tokens",
        "input_cached_image_tokens",
    ),
    "input_uncached_tokens": ("input_text_tokens", "input_audio_tokens", "input_image_tokens"),
    "output_tokens": ("output_text_tokens", "output_audio_tokens", "output_image_tokens"),
}
_TOKEN_DIMS = (*_MODEL, Dimension("batch", kind="bool"), Dimension("service_tier"), _API_SOURCE)

OPENAI_KINDS: tuple[MeterSpec, ...] = (
    MeterSpec(
        "completions",
        _TOKENS,
        _TOKEN_DIMS,
        result_object="organization.usage.completions.result",
        sums=TOKEN_SUMS,
    ),
    _openai("embeddings", _sums("input_tokens", "num_model_requests"), _MODEL),
    _openai("moderations", _sums("input_tokens", "num_model_requests"), _MODEL),
    _openai(
        "images",
        _sums("images", "num_model_requests"),
        (
            Dimension("source", allowed=IMAGE_SOURCES),
            Dimension("size", allowed=IMAGE_SIZES),
            *_MODEL,
        ),
    ),
    _openai("audio_speeches", _sums("characters", "num_model_requests"), _MODEL),
    _openai("audio_transcriptions", _sums("seconds", "num_model_requests"), _MODEL),
    _openai("vector_stores", (Measure("usage_bytes", gauge=True),), (Dimension("project_id"),)),
    _openai("code_interpreter_sessions", _sums("num_sessions"), (Dimension("project_id"),)),
    MeterSpec(
        "decisions",
        _TOKENS,
        _TOKEN_DIMS,
        result_object="organization.usage.decisions.result",
        sums=TOKEN_SUMS,
    ),
    MeterSpec(
        "file_search_calls",
        _sums("num_requests"),
        (*_PEOPLE, Dimension("vector_store_id")),
        result_object="organization.usage.file_searches.result",
    ),
    MeterSpec(
        "web_search_calls",
        _sums("num_requests", "num_model_requests"),
        (*_MODEL, Dimension("context_level", allowed=CONTEXT_LEVELS), _API_SOURCE),
        result_object="organization.usage.web_searches.result",
    ),
)

# Generic meters for an application's own quotas. A meter's main measure has its name;
# gauges (spaces, storage_bytes) carry a ``resource`` dimension so each thing that holds
# storage or counts as a space is its own series.
GENERIC_METERS: tuple[MeterSpec, ...] = (
    MeterSpec(
        "requests",
        _sums("requests"),
        (*_PEOPLE, Dimension("method"), Dimension("route"), Dimension("status")),
    ),
    MeterSpec("tokens", _sums("tokens"), (*_PEOPLE, Dimension("model"))),
    MeterSpec("queries", _sums("queries"), _PEOPLE),
    MeterSpec("spaces", (Measure("spaces", gauge=True),), (*_PEOPLE, Dimension("resource"))),
    MeterSpec(
        "storage_bytes",
        (Measure("storage_bytes", gauge=True),),
        (*_PEOPLE, Dimension("resource")),
    ),
    MeterSpec("tiles", _sums("tiles"), (*_PEOPLE, Dimension("layer"))),
    MeterSpec("credits", _sums("credits"), (*_PEOPLE, Dimension("reason"))),
    MeterSpec("jobs", _sums("jobs"), (*_PEOPLE, Dimension("kind"))),
)

CHARGES_METER = MeterSpec("charges", (Measure("nano_usd", unit="nano-dollars"),), _PEOPLE)
"""Spend given in dollars (``check`` / ``reserve`` / ``debit`` with ``cost=``): one event per
decision, in nano-dollars, priced by the built-in line :data:`meterkit.pricing.CHARGES`, so
costs bill what spend counted. Not a plan metric (its measure is not named after it)."""


def builtin_meters() -> dict[str, MeterSpec]:
    """Every built-in meter by name, in a fresh dict the caller may extend."""
    return {spec.name: spec for spec in (*OPENAI_KINDS, *GENERIC_METERS, CHARGES_METER)}
