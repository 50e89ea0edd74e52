"""Lesson 05 checks: each passes the solution, scores a stub "not attempted", and catches broken variants
(no early stop, tokens counted as blocks, a missing reference, an inner node evicted, a block in use evicted, ...)."""
from __future__ import annotations

import pytest

from course_lib.grading import lesson05
from course_lib.serving.prefix_cache import Node


def _stub(*args):
    raise NotImplementedError("Exercise: write this function")


def _assert_caught(result, hint_part=None):
    assert (result.status, result.points) == ("failed", 0), result
    assert "hint:" in result.message or "your code raised" in result.message
    if hint_part:
        assert hint_part in result.message, result.message


def _key(token_ids, i, P):
    return tuple(token_ids[i * P:(i + 1) * P])


# ---------------------------------------------------------------- 1. match
def match(root, token_ids, block_size, now):
    node, blocks = root, []
    for i in range(len(token_ids) // block_size):
        node = node.children.get(_key(token_ids, i, block_size))
        if node is None:
            break
        node.last_access = now
        blocks.append(node.block_id)
    return blocks, len(blocks) * block_size


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


def match_counts_blocks(root, token_ids, block_size, now):
    blocks, _ = match(root, token_ids, block_size, now)
    return blocks, len(blocks)


def match_no_touch(root, token_ids, block_size, now):
    node, blocks = root, []
    for i in range(len(token_ids) // block_size):
        node = node.children.get(_key(token_ids, i, block_size))
        if node is None:
            break
        blocks.append(node.block_id)
    return blocks, len(blocks) * block_size


def match_partial(root, token_ids, block_size, now):      # also counts a partial block that a child starts with
    blocks, n = match(root, token_ids, block_size, now)
    rest = tuple(token_ids[n:n + block_size])
    node = root
    for b in blocks:
        node = next(c for c in node.children.values() if c.block_id == b)
    if 0 < len(rest) < block_size and any(k[:len(rest)] == rest for k in node.children):
        n += len(rest)
    return blocks, n


def test_match_check():
    assert lesson05.check_match(match).status == "passed"
    assert lesson05.check_match(_stub).status == "not attempted"
    _assert_caught(lesson05.check_match(match_no_stop), "stop at the first block")
    _assert_caught(lesson05.check_match(match_counts_blocks), "counts tokens, not blocks")
    _assert_caught(lesson05.check_match(match_no_touch), "last_access = now")
    _assert_caught(lesson05.check_match(match_partial), "only full blocks")


# ---------------------------------------------------------------- 2. insert
def insert(root, token_ids, blocks, block_size, allocator, now):
    node, cached = root, []
    for i in range(len(token_ids) // block_size):
        key = _key(token_ids, i, block_size)
        child = node.children.get(key)
        if child is None:
            child = Node(blocks[i], key, node, depth=node.depth + 1)
            node.children[key] = child
            allocator.share(blocks[i])
        child.last_access = now
        cached.append(child.block_id)
        node = child
    return cached


def insert_no_share(root, token_ids, blocks, block_size, allocator, now):
    class NoShare:
        def share(self, b):
            return b
    return insert(root, token_ids, blocks, block_size, NoShare(), now)


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
    cached = insert(root, token_ids, blocks, block_size, allocator, now)
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


def insert_touch_new_only(root, token_ids, blocks, block_size, allocator, now):
    node, cached = root, []
    for i in range(len(token_ids) // block_size):
        key = _key(token_ids, i, block_size)
        child = node.children.get(key)
        if child is None:
            child = Node(blocks[i], key, node, depth=node.depth + 1, last_access=now)
            node.children[key] = child
            allocator.share(blocks[i])
        cached.append(child.block_id)
        node = child
    return cached


def insert_flat_depth(root, token_ids, blocks, block_size, allocator, now):   # forgets the depth
    cached = insert(root, token_ids, blocks, block_size, allocator, now)
    stack = [root]
    while stack:
        for child in stack.pop().children.values():
            child.depth = 1
            stack.append(child)
    return cached


def test_insert_check():
    assert lesson05.check_insert(insert).status == "passed"
    assert lesson05.check_insert(_stub).status == "not attempted"
    _assert_caught(lesson05.check_insert(insert_no_share), "allocator.share")
    _assert_caught(lesson05.check_insert(insert_replaces), "an existing node keeps its block")
    _assert_caught(lesson05.check_insert(insert_partial), "only full blocks")
    _assert_caught(lesson05.check_insert(insert_touch_new_only), "last_access = now")
    _assert_caught(lesson05.check_insert(insert_flat_depth), "depth")


# ---------------------------------------------------------------- 3. evict
def _unused_nodes(root, allocator, leaves_only=True):
    out, stack = [], [root]
    while stack:
        for child in stack.pop().children.values():
            stack.append(child)
            if (not leaves_only or not child.children) and allocator.ref_counts[child.block_id] == 1:
                out.append(child)
    return out


def _evict_by(root, allocator, num_blocks, candidates, pick):
    """The eviction loop: take the node ``pick`` chooses among ``candidates()`` until enough blocks are free."""
    freed = []
    while len(freed) < num_blocks:
        nodes = candidates()
        if not nodes:
            break
        victim = pick(nodes)
        del victim.parent.children[victim.token_ids]
        allocator.free(victim.block_id)
        freed.append(victim.block_id)
    return freed


def evict(root, allocator, num_blocks):   # LRU over unused leaves (a parent may become a leaf in turn)
    return _evict_by(root, allocator, num_blocks, lambda: _unused_nodes(root, allocator),
                     lambda leaves: min(leaves, key=lambda n: n.last_access))


def evict_ignores_refs(root, allocator, num_blocks):
    class AllUnused:
        ref_counts = [1] * allocator.num_blocks
    return _evict_by(root, allocator, num_blocks, lambda: _unused_nodes(root, AllUnused),
                     lambda leaves: min(leaves, key=lambda n: n.last_access))


def evict_inner_nodes(root, allocator, num_blocks):   # LRU over every unused node, leaves or not
    return _evict_by(root, allocator, num_blocks, lambda: _unused_nodes(root, allocator, leaves_only=False),
                     lambda nodes: min(nodes, key=lambda n: (n.last_access, n.depth)))


def evict_one_pass(root, allocator, num_blocks):      # the leaves of the start only: parents never become leaves
    leaves = sorted(_unused_nodes(root, allocator), key=lambda n: n.last_access)[:num_blocks]
    for victim in leaves:
        del victim.parent.children[victim.token_ids]
        allocator.free(victim.block_id)
    return [n.block_id for n in leaves]


def evict_mru(root, allocator, num_blocks):
    return _evict_by(root, allocator, num_blocks, lambda: _unused_nodes(root, allocator),
                     lambda leaves: max(leaves, key=lambda n: n.last_access))


def evict_no_free(root, allocator, num_blocks):
    class NoFree:
        ref_counts = allocator.ref_counts
        def free(self, b):
            pass
    return evict(root, NoFree(), num_blocks)


def test_evict_check():
    assert lesson05.check_evict(evict).status == "passed"
    assert lesson05.check_evict(_stub).status == "not attempted"
    _assert_caught(lesson05.check_evict(evict_ignores_refs), "never evict a block a running request uses")
    _assert_caught(lesson05.check_evict(evict_inner_nodes))
    _assert_caught(lesson05.check_evict(evict_one_pass), "its parent may become a leaf")
    _assert_caught(lesson05.check_evict(evict_mru), "LRU order")
    _assert_caught(lesson05.check_evict(evict_no_free), "allocator.free")


# ---------------------------------------------------------------- 4. reusable tokens
@pytest.mark.parametrize("broken, hint", [
    (lambda n, cached, P: cached, "must still run on its last token"),
    (lambda n, cached, P: min(cached, n - 1), "round down to a multiple of block_size"),
    (lambda n, cached, P: (n - 1) // P * P, None),
])
def test_num_reusable_tokens_check(broken, hint):
    assert lesson05.check_num_reusable_tokens(lambda n, cached, P: min(cached, (n - 1) // P * P)).status == "passed"
    assert lesson05.check_num_reusable_tokens(_stub).status == "not attempted"
    _assert_caught(lesson05.check_num_reusable_tokens(broken), hint)
