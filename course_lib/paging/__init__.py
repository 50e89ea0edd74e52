"""Paged KV memory (lesson 02): ``block_manager`` (allocator with reference counts, block tables, copy-on-write),
``paged_cache`` (a cache the model decodes through), ``waste`` (contiguous vs paged memory on real length
distributions)."""
