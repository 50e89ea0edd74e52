"""The serving engine, in vLLM's vocabulary (lessons 04-06, 10): ``engine`` (LLMEngine: add_request / step /
has_unfinished_requests / abort_request, and generate, the loop over them), ``config`` (EngineConfig: its knobs,
validated), ``validation`` (what a request must be), ``scheduler`` and ``sequence`` (waiting / running / swapped,
chunked prefill, preemption), ``prefix_cache`` and ``prefix_hash`` (lesson 05), ``model_runner`` (one step's
flattened batch), ``kv_pool`` (the paged K/V of every layer), ``speculative`` (lesson 06's algorithm) and
``spec_decode`` (its worker in the engine), ``metrics``, and the baselines ``static_batching`` and ``hf_baseline``."""
