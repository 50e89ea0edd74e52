"""Checks of lesson 05 (prefix caching): the longest cached prefix, inserting a sequence's blocks into the tree,
LRU eviction of unused leaves, and how many prompt tokens may be reused.

The learner's functions work on a tree of ``course_lib.serving.prefix_cache.Node`` (children keyed by the tuple of a
block's token ids) and a ``BlockAllocator``. Every check compares them with the library's ``PrefixCache`` on
small hand-made cases first, then on trees grown by random requests that share prefixes (fixed seeds), and
stops at the first failure with the case, expected vs got, and a hint aimed at the usual mistake.
"""
from __future__ import annotations

import functools
import numbers
import random

import torch

from course_lib.paging.block_manager import BlockAllocator
from course_lib.grading.core import Checker, CheckResult
from course_lib.serving.engine import LLMEngine
from course_lib.serving.prefix_cache import Node, PrefixCache, PrefixCachingBlockManager, full_blocks
from course_lib.serving.scheduler import Scheduler


# ---------------------------------------------------------------- test trees
def _random_requests(rng: random.Random, num: int, block_size: int) -> list[list[int]]:
    """Requests built from a few shared prefixes (system prompts) and random continuations over 3 token values,
    so that paths share blocks, branch in the middle of blocks and repeat tokens at other positions."""
    systems = [[rng.randint(1, 3) for _ in range(rng.randint(0, 3 * block_size))] for _ in range(3)]
    return [rng.choice(systems) + [rng.randint(1, 3) for _ in range(rng.randint(0, 3 * block_size))]
            for _ in range(num)]


def _grown_cache(requests, block_size: int, num_blocks: int = 256) -> PrefixCache:
    """A library cache holding the full blocks of every request (each request's blocks freed after it)."""
    cache = PrefixCache(BlockAllocator(num_blocks), block_size)
    for tokens in requests:
        blocks, _ = cache.match(tokens)
        mine = [cache.allocator.allocate() for _ in range(len(tokens) // block_size - len(blocks))]
        cache.insert(tokens, blocks + mine)
        for b in mine:
            cache.allocator.free(b)
    return cache


def _snapshot(root: Node, ref_counts) -> list[tuple]:
    """The tree as a sorted list of (path of block token tuples, block id, last_access, ref count), plus a
    description of the first broken link (a child whose key, parent or depth is wrong)."""
    rows, stack = [], [(root, ())]
    while stack:
        node, path = stack.pop()
        for key, child in node.children.items():
            if not isinstance(child, Node):
                return [f"the child under key {key} is a {type(child).__name__}, not a Node"]
            if child.token_ids != key or child.parent is not node or child.depth != node.depth + 1:
                return [f"the node of block {child.block_id} has token_ids={child.token_ids}, depth={child.depth}, "
                        f"parent={'its parent' if child.parent is node else child.parent!r}; expected token_ids={key}, "
                        f"depth={node.depth + 1} and the node above it as parent"]
            rows.append((path + (key,), child.block_id, child.last_access, ref_counts[child.block_id]))
            stack.append((child, path + (key,)))
    return sorted(rows)


def _describe(cache: PrefixCache) -> str:
    rows = _snapshot(cache.root, cache.allocator.ref_counts)
    return "{" + ", ".join(f"{'/'.join(str(list(k)) for k in path)}: block {b}" for path, b, _, _ in rows) + "}"


# ---------------------------------------------------------------- 1. match
def _check_match_result(c: Checker, got, want, case: str) -> None:
    c.check(isinstance(got, tuple) and len(got) == 2, case=case, expected="a tuple (blocks, num_cached_tokens)",
            got=repr(got), hint="return (list of block ids, number of tokens they hold)")
    blocks, n = got
    want_blocks, want_n = want
    if len(blocks) > len(want_blocks) and list(blocks[:len(want_blocks)]) == want_blocks:
        hint = ("stop at the first block that is not a child of the current node: every later block depends on "
                "the whole prefix before it (the same tokens after another prefix have other K/V)")
    else:
        hint = ("key the children by the whole block, tuple(token_ids[i*P:(i+1)*P]), and go down one level per "
                "block: node = node.children[key]")
    c.check_equal(list(blocks), want_blocks, case=case + ": blocks", hint=hint)
    if n == len(blocks) and n != want_n:
        hint = "num_cached_tokens counts tokens, not blocks: len(blocks) * block_size"
    else:
        hint = "only full blocks are cached: num_cached_tokens = len(blocks) * block_size, never part of a block"
    c.check_equal(n, want_n, case=case + ": num_cached_tokens", hint=hint)


def _match_cases(rng: random.Random):
    """(requests that grow the tree, block_size, [(token_ids, why), ...]): hand-made first, then random."""
    hand = [([], "an empty prompt"), ([1], "shorter than one block"), ([1, 2], "exactly one cached block"),
            ([1, 2, 3], "one block + a partial one (a partial block is never shared)"),
            ([1, 2, 3, 4, 5, 6, 9, 9], "three cached blocks, then a miss"),
            ([1, 2, 3, 9, 5, 6], "diverges inside the second block: later blocks must not match"),
            ([3, 4], "[3, 4] is cached, but only after [1, 2]: a miss at position 0"),
            ([1, 2, 4, 4, 1, 2], "[4, 4] is cached only at the start: a miss here"),
            ([4, 4, 1, 2], "the other branch of the tree")]
    yield [[1, 2, 3, 4, 5, 6], [1, 2, 3, 7], [4, 4, 1, 2]], 2, hand
    for P in (1, 3, 4):
        requests = _random_requests(rng, 12, P)
        queries = [(rng.choice(requests)[: rng.randint(0, 40)] + [rng.randint(1, 3) for _ in range(rng.randint(0, 4))],
                    "a random prompt") for _ in range(25)]
        yield requests, P, queries


def check_match(student_fn) -> CheckResult:
    """``match(root, token_ids, block_size, now) -> (blocks, num_cached_tokens)``: walk down from the root one
    full block (a tuple of block_size token ids) at a time; stop at the first block not among the children;
    set ``last_access = now`` on every matched node."""
    with Checker("match", points=2) as c:
        for requests, P, queries in _match_cases(random.Random(0)):
            ref, mine = _grown_cache(requests, P), _grown_cache(requests, P)   # two identical trees
            for tokens, why in queries:
                now = ref.clock + 1
                want = ref.match(tokens)
                case = f"tree {_describe(mine)} (block_size={P}), token_ids={tokens}: {why}"
                got = student_fn(mine.root, list(tokens), P, now)
                _check_match_result(c, got, want, case)
                mine.clock = ref.clock
                c.check_equal(_snapshot(mine.root, mine.allocator.ref_counts),
                              _snapshot(ref.root, ref.allocator.ref_counts), case=case + ": the tree after the call",
                              hint="set node.last_access = now on every matched node (it keeps a used prefix from "
                                   "being evicted: LRU), change nothing else (no new nodes, no reference counts)")
    return c.result


# ---------------------------------------------------------------- 2. insert
def check_insert(student_fn) -> CheckResult:
    """``insert(root, token_ids, blocks, block_size, allocator, now) -> cached blocks``: for each full block of
    token_ids, go down to the child with its tokens, creating ``Node(blocks[i], key, parent, depth=parent.depth+1)``
    where it is missing and taking a reference (``allocator.share``) for the cache; ``last_access = now`` along
    the path; return the block id of the node of every full block (the tree's, where it already had one)."""
    with Checker("insert", points=3) as c:
        rng = random.Random(1)
        cases = [([[1, 2, 3, 4, 5]], 2, "an empty tree; 2 full blocks + 1 partial token"),
                 ([[1, 2, 3, 4], [1, 2, 3, 4, 5, 6]], 2, "the first 2 blocks are cached: one new node"),
                 ([[1, 2, 3, 4], [1, 2, 9, 9]], 2, "branches after the first block"),
                 ([[1, 2], [2, 1], [1, 2, 1, 2]], 1, "block_size 1: the same tokens at other depths are other nodes")]
        for P in (1, 2, 3, 4):
            cases.append((_random_requests(rng, 10, P), P, "random requests sharing prefixes"))
        for requests, P, why in cases:
            ref = PrefixCache(BlockAllocator(128), P)
            mine = PrefixCache(BlockAllocator(128), P)       # only its root and allocator are used
            for i, tokens in enumerate(requests):
                blocks = [ref.allocator.allocate() for _ in range(len(tokens) // P + 1)]   # the sequence's own blocks
                for _ in blocks:
                    mine.allocator.allocate()
                before = _describe(ref)
                now = ref.clock + 1
                want = ref.insert(tokens, blocks)
                got = student_fn(mine.root, list(tokens), list(blocks), P, mine.allocator, now)
                case = (f"block_size={P}, tree {before}: insert token_ids={tokens} held in blocks={blocks} "
                        f"(request {i} of: {why})")
                c.check_equal(list(got) if isinstance(got, (list, tuple)) else got, want,
                              case=case + ": returned blocks",
                              hint="return one block id per FULL block, the node's: an existing node keeps its block "
                                   "(the cache already holds these tokens there; the caller drops its duplicate)")
                got_rows = _snapshot(mine.root, mine.allocator.ref_counts)
                want_rows = _snapshot(ref.root, ref.allocator.ref_counts)
                if got_rows and isinstance(got_rows[0], str):
                    c.check(False, case=case,
                            expected="every child a Node(block_id, key, parent, depth=parent.depth+1)",
                            got=got_rows[0], hint="create Node(block_id, key, node, depth=node.depth + 1) and store it "
                                                  "in node.children[key]")
                hint = _insert_hint(got_rows, want_rows, P)
                c.check_equal(got_rows, want_rows, case=case + ": the tree (path, block, last_access, ref count)",
                              hint=hint)
                c.check_equal(list(mine.allocator.ref_counts), list(ref.allocator.ref_counts),
                              case=case + ": reference counts of all blocks",
                              hint="share (allocator.share) each block that becomes a node, and only those")
                for b in blocks:                             # the sequence finishes: its references go
                    ref.allocator.free(b)
                    mine.allocator.free(b)
    return c.result


def _insert_hint(got_rows, want_rows, block_size: int) -> str:
    got_paths = {r[0]: r for r in got_rows}
    want_paths = {r[0]: r for r in want_rows}
    if any(len(path[-1]) != block_size for path in got_paths):
        return "only full blocks are cached: skip the last len(token_ids) % block_size tokens"
    if set(got_paths) - set(want_paths):
        return "insert each full block under the node of the block before it (the path spells the prefix)"
    if set(want_paths) - set(got_paths):
        return "create a Node for every full block that is not yet a child: node.children[key] = Node(...)"
    for path, row in want_paths.items():
        g = got_paths[path]
        if g[1] != row[1]:
            return "an existing node keeps its block: do not replace it with the new sequence's block"
        if g[3] != row[3]:
            return ("the cache owns a reference to each of its blocks: call allocator.share(block) once when the "
                    "block becomes a node, never for a node that already existed")
        if g[2] != row[2]:
            return "set last_access = now on every node of the inserted path, old or new"
    return "compare your tree with the expected one"


# ---------------------------------------------------------------- 3. evict
def check_evict(student_fn) -> CheckResult:
    """``evict(root, allocator, num_blocks) -> freed blocks``: repeatedly remove the leaf with the smallest
    last_access among those used by nobody else (reference count 1: only the cache) and free its block, until
    num_blocks are freed or none is left; a parent whose last child goes becomes a leaf."""
    with Checker("evict", points=3) as c:
        rng = random.Random(2)
        for P, num_requests, held_fraction, amounts in [(1, 3, 0.0, [1, 1, 10]), (2, 6, 0.3, [2, 3, 50]),
                                                        (3, 10, 0.3, [1, 5, 100]), (4, 14, 0.5, [4, 8, 100])]:
            requests = _random_requests(rng, num_requests, P)
            if P == 1:
                requests = [[1, 2, 3], [1, 2, 4], [5]]
            ref = _grown_cache(requests, P)
            held = []                                        # running requests hold some paths (ref count 2)
            for tokens in requests:
                if rng.random() < held_fraction:
                    blocks, _ = ref.match(tokens)
                    held += [ref.allocator.share(b) for b in blocks]
            for _ in range(3):                               # touch a few prefixes: changes the LRU order
                tokens = rng.choice(requests)
                ref.match(tokens[: rng.randint(0, len(tokens))])
            mine = _grown_copy(ref)                          # the learner's function works on an identical copy
            for n in amounts:
                before, text = _grown_copy(ref), _describe(ref)
                want = ref.evict(n)
                got = student_fn(mine.root, mine.allocator, n)
                case = (f"block_size={P}, tree {text}, blocks in use by running requests {sorted(set(held))}: "
                        f"evict({n})")
                got_list = list(got) if isinstance(got, (list, tuple)) else got
                hint = _evict_hint(before, got_list, want)
                c.check_equal(got_list, want, case=case + ": the freed blocks, in order", hint=hint)
                c.check_equal(_snapshot(mine.root, mine.allocator.ref_counts),
                              _snapshot(ref.root, ref.allocator.ref_counts),
                              case=case + ": the tree after evicting",
                              hint="remove each evicted node from its parent's children (del parent.children[key])")
                c.check_equal(list(mine.allocator.ref_counts), list(ref.allocator.ref_counts),
                              case=case + ": reference counts",
                              hint="free each evicted block: allocator.free(block_id)")
                c.check_equal(sorted(mine.allocator.free_block_ids), sorted(ref.allocator.free_block_ids),
                              case=case + ": the free list",
                              hint="allocator.free(block_id) puts it back on the free list")
    return c.result


def _evict_hint(before: PrefixCache, got, want) -> str:
    """Replays the reference up to the first wrong block to say what was wrong with it."""
    if not isinstance(got, list):
        return "return the list of the freed block ids, in eviction order"
    i = next((k for k, (g, w) in enumerate(zip(got, want)) if g != w), min(len(got), len(want)))
    if i == len(got):
        return ("when a leaf goes, its parent may become a leaf: keep evicting until num_blocks are freed or no "
                "unused leaf is left")
    state = _grown_copy(before)
    state.evict(i)
    node = state.nodes.get(got[i])
    if node is not None and state.allocator.ref_counts[got[i]] > 1:
        return "never evict a block a running request uses: only blocks whose reference count is 1 (the cache's)"
    if i == len(want):
        return "free at most num_blocks blocks, and only unused leaves"
    if node is not None and node.children:
        return "only leaves (no children) can go, never an inner node: its children would lose their prefix"
    if node is not None and before.nodes[want[i]].children:
        return ("when a leaf goes, its parent may become a leaf (and the next to go): look for the unused leaves "
                "again after each eviction")
    if node is not None:
        return "evict in LRU order: the unused leaf with the smallest last_access first (look again after each one)"
    return "evict only blocks of the tree: the unused leaf with the smallest last_access"


def _grown_copy(cache: PrefixCache) -> PrefixCache:
    """An independent copy of a cache (tree, clock and allocator state)."""
    copy = PrefixCache(BlockAllocator(cache.allocator.num_blocks), cache.block_size)
    copy.allocator.free_block_ids = type(cache.allocator.free_block_ids)(cache.allocator.free_block_ids)
    copy.allocator.ref_counts = list(cache.allocator.ref_counts)
    copy.clock = cache.clock
    stack = [(cache.root, copy.root)]
    while stack:
        src, dst = stack.pop()
        for key, child in src.children.items():
            new = Node(child.block_id, child.token_ids, dst, last_access=child.last_access, depth=child.depth)
            dst.children[key] = new
            copy.nodes[new.block_id] = new
            stack.append((child, new))
    copy.recount_idle()
    return copy


# ---------------------------------------------------------------- 4. reusable tokens
def check_num_reusable_tokens(student_fn) -> CheckResult:
    """``num_reusable_tokens(prompt_len, num_cached_tokens, block_size)``: prompt tokens whose K/V are taken from
    the cache: the cached full blocks, but never the last prompt token (its logits give the first output token)."""
    cases = [(1, 0, 4), (5, 4, 4), (8, 8, 4), (8, 4, 4), (9, 8, 4), (16, 16, 16), (17, 16, 16), (1, 0, 1),
             (3, 3, 1), (33, 32, 16)]
    rng = random.Random(3)
    for _ in range(20):
        P = rng.choice([1, 2, 4, 8, 16])
        n = rng.randint(1, 100)
        cases.append((n, rng.randint(0, n // P) * P, P))
    with Checker("num_reusable_tokens", points=1) as c:
        for n, cached, P in cases:
            want = min(cached, (n - 1) // P * P)
            got = student_fn(n, cached, P)
            case = f"prompt_len={n}, num_cached_tokens={cached}, block_size={P}"
            c.check(isinstance(got, numbers.Integral) and not isinstance(got, bool), case=case,
                    expected=f"an int (a number of tokens), {want}", got=f"{type(got).__name__}: {got!r}",
                    hint="return an int: it slices the prompt (prompt[num_reusable:]); use // for the blocks, not / "
                         "or a float floor")
            if got == cached and cached == n:
                hint = ("the whole prompt is cached, but the model must still run on its last token to get the logits "
                        "of the first output token")
            elif got == min(cached, (n - 1) // P) and got != want:
                hint = "count tokens, not blocks: the number of reusable blocks times block_size"
            elif got == n - 1 and want != n - 1:
                hint = "only full blocks are reused: round down to a multiple of block_size"
            else:
                hint = "the cached full blocks, capped at the full blocks of prompt_len - 1 tokens"
            c.check_equal(got, want, case=case, hint=hint)
    return c.result


# ---------------------------------------------------------------- end to end: the four functions inside LLMEngine
_E2E_BLOCK_SIZE = 4
_PIECES = ("match", "insert", "evict", "num_reusable_tokens")


class _PieceError(Exception):
    """A function returned something the engine cannot use: the message names it and the rule."""


class _LearnerPrefixCache(PrefixCache):
    """The library's ``PrefixCache`` whose tree operations are the learner's functions (``pieces``: match, insert,
    evict; None: the library's method). After each call the library's index of the tree (``nodes``, the idle
    count) is rebuilt from the tree itself, and what a function returned is checked before the engine uses it."""

    def __init__(self, allocator: BlockAllocator, block_size: int, pieces=(None, None, None)):
        super().__init__(allocator, block_size)
        self.pieces = pieces

    def _reindex(self) -> None:
        self.nodes.clear()
        stack = [self.root]
        while stack:
            for child in stack.pop().children.values():
                self.nodes[child.block_id] = child
                stack.append(child)
        self.recount_idle()

    def match(self, token_ids):
        if self.pieces[0] is None:
            return super().match(token_ids)
        node, want = self.root, []                     # the longest cached prefix in this very tree
        for key in full_blocks(token_ids, self.block_size):
            node = node.children.get(key)
            if node is None:
                break
            want.append(node.block_id)
        self.clock += 1
        got = self.pieces[0](self.root, list(token_ids), self.block_size, self.clock)
        where = f"match(root, token_ids of {len(token_ids)} tokens, block_size={self.block_size}, now={self.clock})"
        if not (isinstance(got, tuple) and len(got) == 2 and isinstance(got[0], (list, tuple))
                and isinstance(got[1], int)):
            raise _PieceError(f"{where} returned {str(got)[:80]}: expected (block ids, num_cached_tokens)")
        if list(got[0]) != want:
            raise _PieceError(f"{where} returned the blocks {list(got[0])}, but the tree's longest cached prefix of "
                              f"these tokens is {want}: " + (
                                  "stop at the first block that is not a child of the current node: a later block's "
                                  "K/V depend on the whole prefix before it" if list(got[0][:len(want)]) == want else
                                  "go down from the root one full block at a time, node = node.children[key]"))
        if got[1] != len(want) * self.block_size:
            raise _PieceError(f"{where} returned {len(want)} block(s) holding {got[1]} tokens: num_cached_tokens "
                              "counts tokens, len(blocks) * block_size")
        return want, got[1]

    def insert(self, token_ids, blocks):
        if self.pieces[1] is None:
            return super().insert(token_ids, blocks)
        self.clock += 1
        before, cached = list(self.allocator.ref_counts), set(self.nodes)
        got = self.pieces[1](self.root, list(token_ids), list(blocks), self.block_size, self.allocator, self.clock)
        self._reindex()
        n = len(token_ids) // self.block_size
        where = (f"insert(root, token_ids of {len(token_ids)} tokens, blocks={list(blocks)}, "
                 f"block_size={self.block_size}, ...)")
        if cached - set(self.nodes):
            raise _PieceError(f"{where} took block {min(cached - set(self.nodes))} out of the tree: an existing node "
                              "keeps its block (the cache already holds these tokens there)")
        for b, old in enumerate(before):
            expected = old + (b in self.nodes and b not in cached)
            if self.allocator.ref_counts[b] != expected:
                raise _PieceError(f"{where} left the reference count of block {b} at {self.allocator.ref_counts[b]} "
                                  f"(expected {expected}): call allocator.share(block) once when a block becomes a "
                                  "node, never for a node that already existed")
        if not (isinstance(got, (list, tuple)) and len(got) == n and all(b in self.nodes for b in got)):
            raise _PieceError(f"{where} returned {str(got)[:80]}: expected the {n} block id(s) of the nodes of its "
                              "full blocks")
        return list(got)

    def evict(self, num_blocks: int):
        if self.pieces[2] is None:
            return super().evict(num_blocks)
        before, cached = list(self.allocator.ref_counts), set(self.nodes)
        idle = sum(1 for b in cached if before[b] == 1)
        got = self.pieces[2](self.root, self.allocator, num_blocks)
        self._reindex()
        where = f"evict(root, allocator, num_blocks={num_blocks})"
        if not isinstance(got, (list, tuple)) or not all(isinstance(b, int) and b in cached for b in got):
            raise _PieceError(f"{where} returned {str(got)[:80]}: expected the list of the freed block ids")
        used = [b for b in got if before[b] > 1]
        if used:
            raise _PieceError(f"{where} evicted block {used[0]}, which a running request still uses (reference "
                              f"count {before[used[0]]}): never evict a block a running request uses, only blocks "
                              "whose reference count is 1 (the cache's)")
        gone = cached - set(self.nodes)
        if gone != set(got):
            lost = sorted(gone - set(got))
            raise _PieceError(f"{where} returned {list(got)} but took {sorted(gone)} out of the tree" + (
                f": block {lost[0]} lost its parent without being evicted; only leaves can go, never an inner node"
                if lost else ": remove each evicted node from its parent's children"))
        kept = [b for b in got if self.allocator.ref_counts[b] != 0]
        if kept:
            raise _PieceError(f"{where} evicted block {kept[0]} without freeing it: allocator.free(block_id) gives "
                              "the cache's reference back")
        if len(got) < min(num_blocks, idle):
            raise _PieceError(f"{where} freed {len(got)} block(s) while {idle} cached block(s) were unused: when a "
                              "leaf goes, its parent may become a leaf: keep evicting until num_blocks are freed")
        return list(got)


class _LearnerBlockManager(PrefixCachingBlockManager):
    """The engine's prefix-caching block manager over ``_LearnerPrefixCache``; an admission matches the whole prompt
    and takes ``num_reusable_tokens(prompt_len, num_cached_tokens, block_size)`` tokens of it from the cache."""

    def __init__(self, num_blocks: int, block_size: int, pieces, reusable_fn):
        super().__init__(num_blocks, block_size, cache_cls=lambda a, p: _LearnerPrefixCache(a, p, pieces))
        self.reusable_fn = reusable_fn or (lambda n, cached, P: min(cached, (n - 1) // P * P))

    def _plan(self, token_ids, num_tokens: int):
        blocks, cached = self.prefix_cache.match(token_ids)
        P = self.block_size
        got = self.reusable_fn(num_tokens, cached, P)
        where = f"num_reusable_tokens(prompt_len={num_tokens}, num_cached_tokens={cached}, block_size={P})"
        if not isinstance(got, int) or isinstance(got, bool) or not 0 <= got <= len(blocks) * P or got % P:
            raise _PieceError(f"{where} returned {got!r} (match found {len(blocks)} block(s)): expected a number of "
                              "tokens, whole blocks (a multiple of block_size) and no more than num_cached_tokens")
        if got >= num_tokens:
            raise _PieceError(f"{where} returned {got}: the model must still run on the last prompt token (its logits "
                              "give the first output token), so that token is never reused")
        blocks = blocks[:got // P]
        reused_evictable = sum(1 for b in blocks if self.allocator.ref_counts[b] == 1)
        return blocks, self.num_blocks_for(num_tokens) - len(blocks), self.num_free_blocks - reused_evictable


class _WholePromptScheduler(Scheduler):
    """Admits a sequence on a match of its whole prompt (the library's scheduler matches every token but the last,
    which is what num_reusable_tokens decides here)."""

    def can_allocate(self, seq) -> bool:
        need, free = self.block_manager.num_blocks_to_allocate(seq.token_ids, seq.num_tokens)
        return free - need >= self.watermark_blocks

    def allocate(self, seq) -> None:
        seq.num_computed_tokens = self.block_manager.allocate_with_prefix(seq.seq_id, seq.token_ids, seq.num_tokens)
        if seq.num_preemptions == 0:
            seq.num_cached_tokens = seq.num_computed_tokens


class _LearnerEngine(LLMEngine):
    """``LLMEngine`` with the learner's prefix cache: its block manager and its scheduler are the two above."""

    def __init__(self, model, pieces, reusable_fn, **kwargs):
        super().__init__(model, enable_prefix_caching=True, **kwargs)
        self.block_manager = _LearnerBlockManager(self.num_blocks, self.block_size, pieces, reusable_fn)

    def _new_run(self) -> None:
        super()._new_run()
        self.scheduler.__class__ = _WholePromptScheduler   # the same scheduler, admitting on the whole prompt


def _e2e_waves(tok) -> list[list[tuple[list[int], int]]]:
    """The trace: waves of (prompt, max_tokens), served one ``generate`` call after the other by one engine of
    20 blocks of 4 tokens (the cache outlives a call). Wave 1: R decodes long while Q finishes and the long D
    arrives: D's blocks come from evicting Q's cached block, never R's (in use, though older); later D is
    preempted and resumes on its cached blocks. Wave 2 extends R's prompt; wave 3's new prompt evicts the least
    recently used blocks (D's), so that wave 4 hits R's prompt and wave 2's extension again. Wave 4 also sends a
    prompt whose first and third blocks are R's first and second (its second is not: a miss), and R's prompt
    again, 4 full blocks: its last token must still run through the model."""
    from course_lib.model.corpus import load_text

    text = tok.encode(load_text("validation"))

    def span(i, n):
        return text[i * 64: i * 64 + n]
    R, Q, D = span(0, 16), span(1, 10), span(2, 56)
    return [
        [(R, 12), (Q, 2), (D, 4)],
        [(R + span(3, 5), 4)],
        [(span(4, 32), 4)],
        [(R + span(5, 3), 6), (R + span(3, 5) + span(8, 3), 4), (R[:4] + span(6, 4) + R[4:12] + span(7, 2), 6),
         (R, 4)],
    ]


_E2E_ENGINE = dict(block_size=_E2E_BLOCK_SIZE, num_blocks=20, max_num_seqs=2, max_num_batched_tokens=64,
                   use_kernels=False)


def prefix_cached_generate(match_fn, insert_fn, evict_fn, reusable_fn, waves, caching: bool = True):
    """Serve ``waves`` [[(prompt, max_tokens), ...], ...] with one ``LLMEngine`` on the shipped tiny model
    (float32), one ``generate`` call per wave, its prefix cache made of the given functions (None: the library's);
    ``caching=False``: the plain engine without a prefix cache. Returns {"tokens": [...], "cached": [...],
    "evicted": blocks evicted} per request in order, or {"error": message} when a function returned something the
    engine cannot use. Runs where the learner's code lives (the grader runs it in the notebook's kernel)."""
    from course_lib.grading.lesson01 import _float32_target
    from course_lib.model.sampling import SamplingParams

    model = _float32_target()[0]
    if caching:
        engine = _LearnerEngine(model, (match_fn, insert_fn, evict_fn), reusable_fn, **_E2E_ENGINE)
    else:
        engine = LLMEngine(model, **_E2E_ENGINE)
    tokens, cached, threads = [], [], torch.get_num_threads()
    torch.set_num_threads(1)          # a tiny model: one thread is as fast, and steady when other processes run
    try:
        with torch.no_grad():
            for wave in waves:
                outs = engine.generate([p for p, _ in wave], [SamplingParams(max_tokens=n) for _, n in wave],
                                       use_tqdm=False)
                tokens += [o.token_ids for o in outs]
                cached += [o.num_cached_tokens for o in outs]
    except _PieceError as err:
        return {"error": str(err)}
    finally:
        torch.set_num_threads(threads)
    evicted = engine.block_manager.num_evicted_blocks if caching else 0
    return {"tokens": tokens, "cached": cached, "evicted": evicted}


@functools.lru_cache(maxsize=1)
def _e2e_want():
    """The tokens of the trace without a prefix cache, and the library cache's run of it."""
    from course_lib.grading.lesson01 import _float32_target

    waves = _e2e_waves(_float32_target()[1])
    return (prefix_cached_generate(None, None, None, None, waves, caching=False)["tokens"],
            prefix_cached_generate(None, None, None, None, waves))


def check_end_to_end(match_fn, insert_fn, evict_fn, reusable_fn) -> CheckResult:
    """Your four functions are the prefix cache of ``LLMEngine`` (block size 4, 20 blocks): a trace of requests
    that share prefixes, in four ``generate`` calls on one engine, under memory pressure (blocks are evicted,
    a request is preempted). The tokens must equal those of the engine without a prefix cache, and the prompt
    tokens each request takes from the cache (``RequestOutput.num_cached_tokens``) those of the library's cache.
    When they differ, each function runs alone with the library's others to name the one that changes them."""
    from course_lib.grading.lesson01 import _float32_target
    from course_lib.grading.remote import run_beside

    waves = _e2e_waves(_float32_target()[1])
    prompts = [p for wave in waves for p, _ in wave]
    mine = (match_fn, insert_fn, evict_fn, reusable_fn)

    def serve(*pieces, caching=True):
        return run_beside(match_fn, "course_lib.grading.lesson05:prefix_cached_generate", *pieces, waves, caching)

    with Checker("end_to_end", points=2, timeout_s=120) as c:
        want_tokens, want = _e2e_want()
        c.case = (f"{len(prompts)} requests ({', '.join(str(len(p)) for p in prompts)} prompt tokens) in "
                  f"{len(waves)} generate calls on one engine, block size {_E2E_BLOCK_SIZE}, "
                  f"{_E2E_ENGINE['num_blocks']} blocks")
        got = c.run_together(serve, mine, exercises="1, 2, 3 and 4", expected="values the engine can use")
        wrong = [i for i in range(len(prompts)) if (got["tokens"][i], got["cached"][i]) !=
                 (want_tokens[i], want["cached"][i])]
        if wrong:
            guilty = []
            for k, name in enumerate(_PIECES):
                alone = serve(*[p if j == k else None for j, p in enumerate(mine)])
                if "error" in alone or alone["tokens"] != want_tokens or alone["cached"] != want["cached"]:
                    guilty.append(name)
            hint = (f"with the library's other functions, your {' and your '.join(guilty)} alone already "
                    f"change{'s' * (len(guilty) == 1)} what the engine does" if guilty else
                    "each of your functions works with the library's others, but not together")
            hint += _E2E_HINTS.get(guilty[0] if guilty else None, "")
            i = wrong[0]
            c.check_equal(got["tokens"][i], want_tokens[i], case=f"{c.case}: request {i}'s tokens vs the engine "
                          "without a prefix cache", hint=hint)
            c.check_equal(got["cached"][i], want["cached"][i], case=f"{c.case}: request {i}'s num_cached_tokens "
                          "vs the library's prefix cache", hint=hint)
        c.cases_passed += 1
    return c.result


_E2E_HINTS = {
    "match": ": a prompt that misses in its second block must not reuse any later block (their K/V depend on the "
             "whole prefix before them)",
    "insert": ": each full block goes under the node of the block before it, so that the path spells the prefix",
    "evict": ": evict the unused leaf with the smallest last_access first (LRU), looking again after each one",
    "num_reusable_tokens": ": the cached full blocks, capped at the full blocks of prompt_len - 1 tokens",
    None: "",
}
