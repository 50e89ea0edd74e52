"""The model and everything it needs to run without a serving engine (lessons 00-03): ``config`` (ModelConfig,
PRESETS), ``llama`` (the LLaMA/Qwen decoder), ``rope``, ``attention``, ``kv_cache``, ``checkpoint``
(load_pretrained, load_tiny, save_pretrained), ``tokenizer``, ``corpus``, ``generate``, ``sampling``,
``online_softmax`` (lesson 03's FlashAttention algorithm in plain torch)."""
