"""The cache-aware router (``policy: cache_aware``), one owner per module:

- ``prefix_index``: ``PrefixIndex``, exact per-engine sets of cached prefix hashes (from
  events) plus provisional entries for the router's own decisions; bounded (LRU).
- ``event_feed``: ``CacheEventFeed``, drains ``EngineActor.drain_cache_events`` into it.
- ``sessions``: the session key of a request and the table pinning sessions to engines.
- ``cache_aware``: ``CacheAwarePolicy``, the decision rule.
- ``prompt_tokens``: ``PromptTokens``, the driver's lazily loaded tokenizer for text prompts.
- ``config``: ``RouterConfig``, the tunables (``ServiceConfig.router``).

Nothing here imports torch.
"""
