"""Cost and charge, from a price table and a plan. Integers only; rounding is money.price_quantity's.

cost   = what the provider bills us: tokens x price per 1M (input, cached input, audio, image input, output,
         audio and image output;
         every token at the long-context tier's prices when the input passes its threshold)
         + images x per_image + seconds x per_second + requests x per_request
         + web searches x per_web_search (the provider's server-side search tool)
         + a router's web search results x per_web_result (OpenRouter's: its Exa engine bills per result)
         + containers x per_container[memory limit] (code interpreter and shell containers)
         + prompts grounded with Google Maps x per_maps_grounding
         + a rerank's search units x per_search_unit
         + an explicit cache's token-seconds stored x cache_storage (per 1M token-hours: Gemini's cachedContents)
         + the image_generation tool's tokens at its image model's token prices (its own cost_of)
charge = what the customer pays: for "standard" plans, the plan's own price_list for the model
         when it has one, else cost x (10000 + markup_bps) / 10000 (a negative markup is a
         discount); cost for "at_cost"; 0 for "free" (the cost is still recorded).
"""

from __future__ import annotations

from dataclasses import dataclass

from policyd.money import PRICE_TOKEN_SECONDS, apply_basis_points, price_quantity
from policyd.policy import Plan, Prices

# Strict reservations bound input tokens by bytes: a byte-level BPE token is at least one byte,
# plus the chat formatting a provider adds per message and per request.
STRICT_TOKENS_PER_MESSAGE = 8
STRICT_TOKENS_PER_REQUEST = 16
# The default estimate: about four bytes of English per token.
ESTIMATE_BYTES_PER_TOKEN = 4
ESTIMATE_TOKENS_PER_MESSAGE = 4


@dataclass(frozen=True)
class Quantities:
    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_input_tokens: int = 0
    output_tokens: int = 0
    images: int = 0
    seconds: int = 0
    requests: int = 1
    web_searches: int = 0
    web_results: int = 0  # results of a router's web search, at per_web_result
    file_searches: int = 0
    cache_write_1h_input_tokens: int = 0  # of cache_write_input_tokens
    service_tier: str = ""  # the provider's processing tier (its own token prices when the table has them)
    audio_input_tokens: int = 0  # of input_tokens (uncached)
    audio_output_tokens: int = 0  # of output_tokens
    image_input_tokens: int = 0  # of input_tokens (uncached)
    image_output_tokens: int = 0  # of output_tokens (Gemini's image models: images out at their own price)
    containers: int = 0  # hosted containers the provider made (code_interpreter, shell), at per_container[memory]
    maps_groundings: int = 0  # prompts grounded with Google Maps (Gemini), at per_maps_grounding
    search_units: int = 0  # a rerank's search units, at per_search_unit
    container_memory: str = ""
    # the search context size a request's web search ran with: a fee each request by it (per_search_context)
    search_context_size: str = ""
    reasoning_output_tokens: int = 0  # of output_tokens: reasoning billed at its own price (Perplexity's)
    # an explicit cache's tokens x the seconds it is kept (Gemini's cachedContents), at cache_storage
    cache_storage_token_seconds: int = 0
    # tokens of a hosted tool priced at another model's prices (the image_generation tool's, at its image
    # model's: image_generation_cost): counted in token limits, not priced here
    tool_tokens: int = 0

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens + self.tool_tokens


def cost_of(price: Prices, q: Quantities) -> int:
    """What the quantities cost at the price, each quantity priced by THE rounding rule (money.price_quantity);
    quantities of none cost nothing and are passed over (most requests have a few of the kinds)."""
    tokens = price.for_input(q.input_tokens, q.service_tier)  # a service or long-context tier prices every token
    cost = 0
    text_input = (q.input_tokens - q.cached_input_tokens - q.cache_write_input_tokens - q.audio_input_tokens
                  - q.image_input_tokens)
    if text_input:
        cost += price_quantity(text_input, tokens.input)
    if q.audio_input_tokens:
        cost += price_quantity(q.audio_input_tokens, tokens.audio_input_price)
    if q.image_input_tokens:
        cost += price_quantity(q.image_input_tokens, tokens.image_input_price)
    if q.cached_input_tokens:
        cost += price_quantity(q.cached_input_tokens, tokens.cached_input_price)
    if q.cache_write_input_tokens:
        cost += price_quantity(q.cache_write_input_tokens - q.cache_write_1h_input_tokens,
                               tokens.cache_write_input_price) \
            + price_quantity(q.cache_write_1h_input_tokens, tokens.cache_write_1h_input_price)
    text_output = q.output_tokens - q.audio_output_tokens - q.image_output_tokens - q.reasoning_output_tokens
    if text_output:
        cost += price_quantity(text_output, tokens.output)
    if q.reasoning_output_tokens:
        cost += price_quantity(q.reasoning_output_tokens, tokens.reasoning_output_price)
    if q.audio_output_tokens:
        cost += price_quantity(q.audio_output_tokens, tokens.audio_output_price)
    if q.image_output_tokens:
        cost += price_quantity(q.image_output_tokens, tokens.image_output_price)
    cost += q.images * price.per_image + q.seconds * price.per_second + q.requests * price.per_request
    if q.web_searches:
        cost += (min(q.web_searches, 1) if price.web_search_unit == "request" else q.web_searches) * price.per_web_search
    if q.web_results:
        cost += q.web_results * price.per_web_result
    if q.file_searches:
        cost += q.file_searches * price.per_file_search
    if q.containers:
        cost += q.containers * price.per_container.get(q.container_memory, 0)
    if q.maps_groundings:
        cost += q.maps_groundings * price.per_maps_grounding
    if q.search_units:
        cost += q.search_units * price.per_search_unit
    if price.per_search_context:
        cost += q.requests * price.search_context_fee(q.search_context_size)
    if q.cache_storage_token_seconds:
        cost += price_quantity(q.cache_storage_token_seconds, price.cache_storage, PRICE_TOKEN_SECONDS)
    return cost


# The image_generation tool (the Responses API's): each partial image a streamed call sends is billed as
# 100 image output tokens (OpenAI's published figure), beside the image's own
PARTIAL_IMAGE_OUTPUT_TOKENS = 100


def image_generation_quantities(input_tokens: int, cached_input_tokens: int, image_input_tokens: int,
                                output_tokens: int) -> Quantities:
    """The image_generation tool's usage as priced at its image model's prices (no request of its own)."""
    return Quantities(input_tokens=input_tokens, cached_input_tokens=cached_input_tokens,
                      image_input_tokens=image_input_tokens, output_tokens=output_tokens, requests=0)


def billing_of(plan: Plan, feature: str) -> str:
    """standard | at_cost | free | promo (a feature the plan promotes: charged 0, cost kept)."""
    return "promo" if feature and feature in plan.promo_features else plan.billing


def charge_of(plan: Plan, model: str, q: Quantities, cost: int, billing: str = "") -> int:
    billing = billing or plan.billing
    if billing in ("free", "promo"):
        return 0
    if billing == "at_cost":
        return cost
    listed = plan.price_list.get(model)
    if listed is not None:
        return cost_of(listed, q)
    return apply_basis_points(cost, 10_000 + plan.markup_bps)


def estimate_input_tokens(plan: Plan, prompt_bytes: int, message_count: int, reported_tokens: int,
                          context_window: int = 0, unseen_input: bool = False) -> int:
    """Input tokens to reserve for. Strict: a true upper bound: the bytes' bound (or the proxy's count when
    greater: a prompt of token ids has no text to bound), or the model's context window when that is less,
    or when the request refers to input it does not carry (its caller refuses such a request on a model
    with no window). Estimate: `input_estimate`."""
    if plan.reservation == "strict":
        if unseen_input and context_window:
            return context_window
        bound = max(prompt_bytes + STRICT_TOKENS_PER_MESSAGE * max(message_count, 1) + STRICT_TOKENS_PER_REQUEST,
                    reported_tokens)
        return min(bound, context_window) if context_window else bound
    return input_estimate(prompt_bytes, message_count, reported_tokens)


def input_estimate(prompt_bytes: int, message_count: int, reported_tokens: int) -> int:
    """The likely input tokens: the proxy's count, else about four bytes a token. A request settled
    without the provider's usage (a cut stream) is charged this much input, never a strict bound."""
    if reported_tokens > 0:
        return reported_tokens
    bytes_tokens = -(-prompt_bytes // ESTIMATE_BYTES_PER_TOKEN)
    return bytes_tokens + ESTIMATE_TOKENS_PER_MESSAGE * max(message_count, 1)


# Rerank. Cohere's and Bedrock's rerankers bill search units: a query with up to 100 document chunks. A document
# longer than a chunk is split, each chunk counted: a chunk holds the model's context window less the query
# (which the provider truncates to at most half of it) and a few tokens of its own (Cohere's four), so at least
# half the window, less RERANK_CHUNK_RESERVED_TOKENS, of a document's tokens.
DOCUMENTS_PER_SEARCH_UNIT = 100
RERANK_CHUNK_RESERVED_TOKENS = 8


def rerank_chunks_most(documents: int, document_bytes: int, document_tokens_max: int, context_window: int) -> int:
    """The most chunks a rerank's documents may be split into: each document a chunk, and one more for every
    chunk's least room (half the context window, less the reserved tokens) of its bytes (a token is at least a
    byte), at most as many as `document_tokens_max` (the tokens the provider reads of each) fill; a model with
    no context window given: a chunk a document."""
    room = context_window // 2 - RERANK_CHUNK_RESERVED_TOKENS
    if room <= 0:
        return documents
    chunks = documents + document_bytes // room
    return min(chunks, documents * -(-document_tokens_max // room)) if document_tokens_max else chunks


def rerank_search_units(documents: int, document_bytes: int, document_tokens_max: int, context_window: int) -> int:
    """The most search units a rerank may bill: its most chunks, a unit a hundred."""
    chunks = rerank_chunks_most(documents, document_bytes, document_tokens_max, context_window)
    return max(1, -(-chunks // DOCUMENTS_PER_SEARCH_UNIT))


def rerank_search_units_likely(documents: int) -> int:
    """The fewest search units a rerank bills (each document one chunk): what one charged without the
    provider's count is charged."""
    return max(1, -(-documents // DOCUMENTS_PER_SEARCH_UNIT))


# Speech to text. A provider bills the audio's seconds (whisper-1: per_second) or its audio tokens
# (gpt-4o-transcribe: 10 audio tokens a second, its published rate). A WAV file's header gives its
# seconds exactly; other formats are compressed, so the bytes bound them: no codec a provider accepts
# holds a second in fewer than 750 bytes (6 kb/s, Opus's lowest rate; MP3's is 8 kb/s), and speech is
# usually sent at about 128 kb/s.
AUDIO_TOKENS_PER_SECOND = 10
AUDIO_BYTES_PER_SECOND_MIN = 750
AUDIO_BYTES_PER_SECOND_LIKELY = 16_000


# Text to speech billed by tokens (gpt-4o-mini-tts): its audio out is about 1,250 audio tokens a minute
# (OpenAI's published $0.015 a minute at $12 per 1M audio tokens), and speech about 900 characters a
# minute: 7 audio tokens for 5 characters. A reply that reports no usage (audio bytes, not
# stream_format sse) is charged this many, marked estimated.
SPEECH_AUDIO_TOKENS_PER_CHARACTERS = (7, 5)


def speech_audio_tokens_likely(characters: int) -> int:
    tokens, characters_per = SPEECH_AUDIO_TOKENS_PER_CHARACTERS
    return -(-max(characters, 0) * tokens // characters_per)


def audio_seconds(plan: Plan, exact_seconds: int, audio_bytes: int, max_audio_seconds: int = 0) -> int:
    """Seconds of audio to reserve for: the exact seconds when known; else, strict, the most the bytes can
    hold (at most the model's longest audio, when it has one); estimate, `audio_seconds_likely`."""
    if exact_seconds > 0 or audio_bytes <= 0:
        return exact_seconds
    if plan.reservation == "strict":
        bound = -(-audio_bytes // AUDIO_BYTES_PER_SECOND_MIN)
        return min(bound, max_audio_seconds) if max_audio_seconds else bound
    return audio_seconds_likely(exact_seconds, audio_bytes)


def audio_seconds_likely(exact_seconds: int, audio_bytes: int) -> int:
    """The likely seconds: exact when known, else the bytes at speech's usual rate. A request settled
    without the provider's usage (a reply in text, srt or vtt) is charged this many."""
    if exact_seconds > 0 or audio_bytes <= 0:
        return exact_seconds
    return -(-audio_bytes // AUDIO_BYTES_PER_SECOND_LIKELY)
