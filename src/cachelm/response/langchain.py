"""A LangChain `BaseCache` backed by a cachelm `ExactCache` (or any `Store`).

    from langchain_core.globals import set_llm_cache
    set_llm_cache(LangChainCache(ExactCache(open_store("sqlite:///cache.db")), tenant="acme"))

Contract:

- The key is the exact-cache key of ``{"model", "llm_string", "prompt"}`` under the endpoint
  ``"langchain"``: LangChain's ``llm_string`` carries the model's parameters (temperature included), so a
  change of any parameter is a different entry. LangChain decides what to cache (it caches whatever a
  model with a cache returns), so sampled calls are cached too: that is LangChain's contract.
- Generations are stored as plain JSON (text, ``generation_info``, and for chat models the message via
  ``message_to_dict``), never as pickles or LangChain-serialised objects, so reading a shared cache cannot
  instantiate arbitrary classes. Chunks come back as their non-chunk classes.
- Entries carry the tag ``"langchain"`` and the model name when ``llm_string`` names one (``model`` or
  ``model_name``), so they can be invalidated by tag or model. `clear` removes this tenant's entries.
- A store failure is a miss (lookup) or a skipped write (update), counted in the cache's metrics; a
  generation that JSON cannot hold is not cached and logged, never raised into the model call. Bad
  options (``tenant``, ``user``, ``tags``, ``ttl``) raise `ConfigError` when the adapter is made.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from typing import Any

from langchain_core.caches import RETURN_VAL_TYPE, BaseCache
from langchain_core.messages import message_to_dict, messages_from_dict
from langchain_core.outputs import ChatGeneration, Generation

from cachelm.errors import BackendError, ConfigError
from cachelm.response.exact import LAYER, ExactCache
from cachelm.store.base import DEFAULT_TENANT, Match, Store, check_ttl

log = logging.getLogger(__name__)

ENDPOINT = "langchain"
TAG = "langchain"
_MODEL = re.compile(r"\(?'(?:model|model_name)', '([^']+)'\)?")


def model_of(llm_string: str) -> str:
    """The model named in `llm_string` (``('model', 'x')`` or ``('model_name', 'x')``), else ``""``."""
    found = _MODEL.search(llm_string)
    return found.group(1) if found else ""


def encode_generations(generations: Sequence[Generation]) -> dict[str, Any]:
    """The JSON-able form of `generations` (see the module docstring)."""
    out = []
    for g in generations:
        item: dict[str, Any] = {"text": g.text, "generation_info": g.generation_info}
        if isinstance(g, ChatGeneration):
            item["message"] = message_to_dict(g.message)
        out.append(item)
    return {"generations": out}


def decode_generations(payload: Any) -> list[Generation]:
    """Generations from `encode_generations` output; raises ValueError on anything else."""
    if not isinstance(payload, dict) or not isinstance(payload.get("generations"), list):
        raise ValueError("not a generations payload")
    out: list[Generation] = []
    for item in payload["generations"]:
        if "message" in item:
            message = messages_from_dict([item["message"]])[0]
            out.append(ChatGeneration(message=message, generation_info=item.get("generation_info")))
        else:
            out.append(Generation(text=item["text"], generation_info=item.get("generation_info")))
    return out


class LangChainCache(BaseCache):
    """LangChain's LLM cache interface over an `ExactCache`."""

    def __init__(
        self,
        cache: ExactCache | Store,
        *,
        tenant: str = DEFAULT_TENANT,
        user: str = "",
        tags: Iterable[str] = (),
        ttl: float | None = None,
    ) -> None:
        if isinstance(cache, Store):
            cache = ExactCache(cache)
        if not isinstance(cache, ExactCache):
            raise ConfigError(f"`cache` must be an ExactCache or a Store, got {type(cache).__name__}")
        if not isinstance(tenant, str) or not tenant:
            raise ConfigError(f"`tenant` must be a non-empty string, got {tenant!r}")
        if not isinstance(user, str):
            raise ConfigError(f"`user` must be a string, got {user!r}")
        if isinstance(tags, str):
            raise ConfigError(f"`tags` must be an iterable of strings, not a string: {tags!r}")
        tags = tuple(tags)
        if not all(isinstance(tag, str) and tag for tag in tags):
            raise ConfigError(f"`tags` must be non-empty strings, got {tags!r}")
        # Checked here: a bad option found by `update` would be logged and swallowed on every write.
        check_ttl(ttl)
        self.cache = cache
        self.tenant = tenant
        self.user = user
        self.tags = (TAG, *tags)
        self.ttl = ttl

    @staticmethod
    def _request(prompt: str, llm_string: str) -> dict[str, Any]:
        return {"model": model_of(llm_string), "llm_string": llm_string, "prompt": prompt}

    def lookup(self, prompt: str, llm_string: str) -> RETURN_VAL_TYPE | None:
        hit = self.cache.lookup(
            self._request(prompt, llm_string), tenant=self.tenant, endpoint=ENDPOINT, allow_sampled=True
        )
        if hit is None:
            return None
        try:
            return decode_generations(hit.response)
        except (ValueError, KeyError, TypeError):
            # Not ours (another writer under the same key space): a miss, and the entry is dropped.
            self.cache.metrics.error(LAYER, "decode")
            try:
                self.cache.invalidate(hit.key)
            except BackendError:  # the entry stays and the next lookup tries again: still only a miss
                self.cache.metrics.error(LAYER, "backend")
            return None

    def update(self, prompt: str, llm_string: str, return_val: RETURN_VAL_TYPE) -> None:
        try:
            self.cache.store(
                self._request(prompt, llm_string),
                encode_generations(return_val),
                tenant=self.tenant,
                user=self.user,
                tags=self.tags,
                ttl=self.ttl,
                endpoint=ENDPOINT,
                allow_sampled=True,
            )
        except ConfigError as exc:
            self.cache.metrics.error(LAYER, "encode")
            log.warning("cachelm: a LangChain generation was not cached: %s", exc)

    def clear(self, **kwargs: Any) -> None:
        """Delete every LangChain entry of this tenant."""
        self.cache.backend.purge(Match(tenant=self.tenant, tag=TAG))

    # The stores are synchronous and fast (memory, SQLite, one Redis round trip): calling them from the
    # event loop avoids BaseCache's default hop through a thread pool executor.
    async def alookup(self, prompt: str, llm_string: str) -> RETURN_VAL_TYPE | None:
        return self.lookup(prompt, llm_string)

    async def aupdate(self, prompt: str, llm_string: str, return_val: RETURN_VAL_TYPE) -> None:
        self.update(prompt, llm_string, return_val)

    async def aclear(self, **kwargs: Any) -> None:
        self.clear(**kwargs)
