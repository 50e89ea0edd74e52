"""Lesson 05 checks: each passes the solution, scores a stub "not attempted", and catches broken variants
(no early stop, tokens counted as blocks, a missing reference, an inner node evicted, a block in use evicted, ...)."""
from __future__ import annotations

import pytest

from course_lib.grading import lesson05
from course_lib.serving.prefix_cache import Node
from conftest import assert_caught, assert_not_attempted, edited, solution, stub

SOLVED = solution("05_prefix_caching")


def _key(token_ids, i, P):
    return tuple(token_ids[i * P:(i + 1) * P])


# ---------------------------------------------------------------- 1. match
def match_no_stop(root, token_ids, block_size, now):      # skips a missing block instead of stopping
    node, blocks = root, []
    for i in range(len(token_ids) // block_size):
        child = node.children.get(_key(token_ids, i, block_size))
        if child is None:
            continue
        child.last_access = now
        blocks.append(child.block_id)
        node = child
    return blocks, len(blocks) * block_size


match_counts_blocks = edited(SOLVED.match, {"return blocks, len(blocks) * block_size": "return blocks, len(blocks)"})
match_no_touch = edited(SOLVED.match, {"        node.last_access = now\n": ""})


match_stride_one = edited(SOLVED.match, {   # block i read at token i, not at token i * block_size
    "tuple(token_ids[i * block_size:(i + 1) * block_size])": "tuple(token_ids[i:i + block_size])"})
match_touch_last_only = edited(SOLVED.match, {   # only the deepest matched node is touched
    "        node.last_access = now\n": "", "    return blocks, len(blocks) * block_size":
    "    if blocks:\n        node = root\n        for b in blocks:\n"
    "            node = next(c for c in node.children.values() if c.block_id == b)\n"
    "        node.last_access = now\n    return blocks, len(blocks) * block_size"})


def match_partial(root, token_ids, block_size, now):      # also counts a partial block that a child starts with
    blocks, n = SOLVED.match(root, token_ids, block_size, now)
    rest = tuple(token_ids[n:n + block_size])
    node = root
    for b in blocks:
        node = next(c for c in node.children.values() if c.block_id == b)
    if 0 < len(rest) < block_size and any(k[:len(rest)] == rest for k in node.children):
        n += len(rest)
    return blocks, n


def test_match_check():
    assert lesson05.check_match(SOLVED.match).status == "passed"
    assert_not_attempted(lesson05.check_match(stub))
    assert_caught(lesson05.check_match(match_no_stop), "stop at the first block")
    assert_caught(lesson05.check_match(match_counts_blocks), "counts tokens, not blocks")
    assert_caught(lesson05.check_match(match_no_touch), "last_access = now")
    assert_caught(lesson05.check_match(match_partial), "only full blocks")
    assert_caught(lesson05.check_match(match_stride_one), "tuple(token_ids[i*P:(i+1)*P])")
    assert_caught(lesson05.check_match(match_touch_last_only), "last_access = now on every matched node")


# ---------------------------------------------------------------- 2. insert
def insert_no_share(root, token_ids, blocks, block_size, allocator, now):
    class NoShare:
        def share(self, b):
            return b
    return SOLVED.insert(root, token_ids, blocks, block_size, NoShare(), now)


def insert_replaces(root, token_ids, blocks, block_size, allocator, now):   # overwrites existing nodes
    node, cached = root, []
    for i in range(len(token_ids) // block_size):
        key = _key(token_ids, i, block_size)
        old = node.children.get(key)
        child = Node(blocks[i], key, node, depth=node.depth + 1, children=old.children if old else {})
        node.children[key] = child
        allocator.share(blocks[i])
        child.last_access = now
        cached.append(child.block_id)
        node = child
    return cached


def insert_partial(root, token_ids, blocks, block_size, allocator, now):   # caches the partial last block too
    cached = SOLVED.insert(root, token_ids, blocks, block_size, allocator, now)
    n = len(token_ids) // block_size
    if len(token_ids) % block_size:
        node = root
        for i in range(n):
            node = node.children[_key(token_ids, i, block_size)]
        key = tuple(token_ids[n * block_size:])
        if key not in node.children:
            node.children[key] = Node(blocks[n], key, node, depth=node.depth + 1, last_access=now)
            allocator.share(blocks[n])
    return cached


insert_touch_new_only = edited(SOLVED.insert, {          # a node already cached keeps its old last_access
    "depth=node.depth + 1)": "depth=node.depth + 1, last_access=now)", "        child.last_access = now\n": ""})


insert_shares_existing = edited(SOLVED.insert, {   # a reference taken for a node that was already cached
    "            allocator.share(blocks[i])          # the cache becomes one more owner of the block\n": "",
    "        child.last_access = now\n": "        allocator.share(child.block_id)\n        child.last_access = now\n"})
insert_from_root = edited(SOLVED.insert, {"        node = child\n": ""})   # every block put under the root


def insert_flat_depth(root, token_ids, blocks, block_size, allocator, now):   # forgets the depth
    cached = SOLVED.insert(root, token_ids, blocks, block_size, allocator, now)
    stack = [root]
    while stack:
        for child in stack.pop().children.values():
            child.depth = 1
            stack.append(child)
    return cached


def test_insert_check():
    assert lesson05.check_insert(SOLVED.insert).status == "passed"
    assert_not_attempted(lesson05.check_insert(stub))
    assert_caught(lesson05.check_insert(insert_no_share), "allocator.share")
    assert_caught(lesson05.check_insert(insert_replaces), "an existing node keeps its block")
    assert_caught(lesson05.check_insert(insert_partial), "only full blocks")
    assert_caught(lesson05.check_insert(insert_touch_new_only), "last_access = now")
    assert_caught(lesson05.check_insert(insert_flat_depth), "depth")
    assert_caught(lesson05.check_insert(insert_shares_existing), "never for a node that already existed")
    assert_caught(lesson05.check_insert(insert_from_root), "under the node of the block before it")


# ---------------------------------------------------------------- 3. evict
evict_ignores_refs = edited(SOLVED.evict, {"elif allocator.ref_counts[child.block_id] == 1:": "else:"})
evict_inner_nodes = edited(SOLVED.evict, {            # LRU over every unused node, leaves or not
    "if child.children:\n                    stack.append(child)\n                elif allocator":
    "stack.append(child)\n                if allocator",
    "min(leaves, key=lambda n: n.last_access)": "min(leaves, key=lambda n: (n.last_access, n.depth))"})
evict_mru = edited(SOLVED.evict, {"victim = min(leaves": "victim = max(leaves"})


evict_fifo = edited(SOLVED.evict, {"min(leaves, key=lambda n: n.last_access)":   # oldest block id, not LRU
                                  "min(leaves, key=lambda n: n.block_id)"})
evict_no_unlink = edited(SOLVED.evict, {   # frees the block but leaves its node in the tree
    "        del victim.parent.children[victim.token_ids]\n": ""})


def evict_one_pass(root, allocator, num_blocks):      # the leaves of the start only: parents never become leaves
    leaves, stack = [], [root]
    while stack:
        for child in stack.pop().children.values():
            stack.append(child)
            if not child.children and allocator.ref_counts[child.block_id] == 1:
                leaves.append(child)
    leaves = sorted(leaves, key=lambda n: n.last_access)[:num_blocks]
    for victim in leaves:
        del victim.parent.children[victim.token_ids]
        allocator.free(victim.block_id)
    return [n.block_id for n in leaves]


def evict_no_free(root, allocator, num_blocks):
    class NoFree:
        ref_counts = allocator.ref_counts
        def free(self, b):
            pass
    return SOLVED.evict(root, NoFree(), num_blocks)


def test_evict_check():
    assert lesson05.check_evict(SOLVED.evict).status == "passed"
    assert_not_attempted(lesson05.check_evict(stub))
    assert_caught(lesson05.check_evict(evict_ignores_refs), "never evict a block a running request uses")
    assert_caught(lesson05.check_evict(evict_inner_nodes))
    assert_caught(lesson05.check_evict(evict_one_pass), "its parent may become a leaf")
    assert_caught(lesson05.check_evict(evict_mru), "LRU order")
    assert_caught(lesson05.check_evict(evict_no_free), "allocator.free")
    assert_caught(lesson05.check_evict(evict_fifo), "LRU order")
    assert_caught(lesson05.check_evict(evict_no_unlink))


# ---------------------------------------------------------------- 4. reusable tokens
@pytest.mark.parametrize("broken, hint", [
    (lambda n, cached, P: cached, "must still run on its last token"),
    (lambda n, cached, P: min(cached, n - 1), "round down to a multiple of block_size"),
    (lambda n, cached, P: (n - 1) // P * P, None),
    (lambda n, cached, P: min(cached, (n - 1) // P), "tokens, not blocks"),                  # a number of blocks
    (lambda n, cached, P: min(cached, n // P * P), "must still run on its last token"),      # the last token reused
    (lambda n, cached, P: min(cached, float((n - 1) // P * P)), "return an int"),           # a float count
])
def test_num_reusable_tokens_check(broken, hint):
    assert lesson05.check_num_reusable_tokens(SOLVED.num_reusable_tokens).status == "passed"
    assert_not_attempted(lesson05.check_num_reusable_tokens(stub))
    assert_caught(lesson05.check_num_reusable_tokens(broken), hint)


# ---------------------------------------------------------------- end to end: the four functions inside LLMEngine
@pytest.mark.usefixtures("one_thread")
def test_end_to_end_trace_evicts_preempts_and_matches_the_library_engine(tiny):
    """The trace does what the check says (evictions, a preemption, hits) and the check's engine, with the
    library's pieces, caches exactly what LLMEngine(enable_prefix_caching=True) caches."""
    from course_lib.model.sampling import SamplingParams
    from course_lib.serving.engine import LLMEngine

    model, tok = tiny
    waves = lesson05._e2e_waves(tok)
    plain = lesson05.prefix_cached_generate(None, None, None, None, waves, caching=False)
    lib = lesson05.prefix_cached_generate(None, None, None, None, waves)
    assert lib["tokens"] == plain["tokens"] and lib["evicted"] > 0 and sum(lib["cached"]) > 0
    engine, cached, preempted = LLMEngine(model, enable_prefix_caching=True, **lesson05._E2E_ENGINE), [], 0
    for wave in waves:
        outs = engine.generate([p for p, _ in wave], [SamplingParams(max_tokens=n) for _, n in wave], use_tqdm=False)
        cached += [o.num_cached_tokens for o in outs]
        preempted += engine.scheduler.num_preemptions["recompute"]
    assert cached == lib["cached"] and preempted > 0
    assert engine.block_manager.num_evicted_blocks == lib["evicted"]


def _pieces(**broken):
    pieces = dict(match=SOLVED.match, insert=SOLVED.insert, evict=SOLVED.evict,
                  num_reusable_tokens=SOLVED.num_reusable_tokens)
    return [broken.get(name, fn) for name, fn in pieces.items()]


@pytest.mark.usefixtures("one_thread")
def test_end_to_end_check():
    assert lesson05.check_end_to_end(*_pieces()).status == "passed"
    assert_not_attempted(lesson05.check_end_to_end(stub, stub, stub, stub))
    assert_not_attempted(lesson05.check_end_to_end(*_pieces(num_reusable_tokens=stub)))
    assert_not_attempted(lesson05.check_end_to_end(*_pieces(evict=stub)))


@pytest.mark.parametrize("broken, hint", [
    (dict(match=match_no_stop), "stop at the first block that is not a child"),
    (dict(match=match_counts_blocks), "counts tokens, len(blocks) * block_size"),
    (dict(insert=insert_from_root), "your insert alone already changes what the engine does"),
    (dict(insert=insert_no_share), "call allocator.share(block) once when a block becomes a node"),
    (dict(insert=insert_shares_existing), "never for a node that already existed"),
    (dict(evict=evict_ignores_refs), "never evict a block a running request uses"),
    (dict(evict=evict_mru), "your evict alone already changes what the engine does: evict the unused leaf with the "
                            "smallest last_access first (LRU)"),
    (dict(evict=evict_fifo), "your evict alone already changes what the engine does: evict the unused leaf with "
                             "the smallest last_access first (LRU)"),
    (dict(evict=evict_inner_nodes), "only leaves can go, never an inner node"),
    (dict(evict=evict_one_pass), "keep evicting until num_blocks are freed"),
    (dict(num_reusable_tokens=lambda n, cached, P: cached), "the model must still run on the last prompt token"),
    (dict(num_reusable_tokens=lambda n, cached, P: min(cached, (n - 1) // P)), "whole blocks (a multiple of "
                                                                               "block_size)"),
])
@pytest.mark.usefixtures("one_thread")
def test_end_to_end_check_catches(broken, hint):
    assert_caught(lesson05.check_end_to_end(*_pieces(**broken)), hint)
