"""MemServe: context caching + prefill/decode disaggregation over an elastic KV memory pool."""

__version__ = "0.1.0"
