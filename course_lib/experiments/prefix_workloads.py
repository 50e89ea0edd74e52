"""Workloads with shared prefixes, a token-level simulation of the prefix cache, and a tree picture (lesson 05).

Two workloads where prefix caching pays:

* **shared system prompt**: every request starts with the same long instructions (one of a few system
  prompts), then its own short question;
* **multi-turn chat**: turn t of a conversation sends the whole history again (system prompt, every user
  message and every reply so far) plus the new user message, so each turn's prompt starts with the previous
  turn's prompt *and* its reply.

Prompts are windows of the validation text of the course's corpus (with a tokenizer) or random token ids.

``simulate_prefix_cache`` replays requests one after the other through a ``PrefixCachingBlockManager``, with
no model: each request reuses the longest cached prefix of its prompt (never its last token), computes the rest,
caches its full blocks (the reply's too) and finishes. It counts the prompt tokens served from the cache: the
**hit rate** = cached prompt tokens / prompt tokens, i.e. the fraction of prefill work saved.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from course_lib.serving.prefix_cache import PrefixCache, PrefixCachingBlockManager


def _token_source(tokenizer=None, vocab_size: int | None = None, seed: int = 0):
    """A function n -> n token ids: consecutive windows of the validation text, or random ids."""
    rng = np.random.default_rng(seed)
    if tokenizer is not None:
        from course_lib.model.corpus import load_text

        text = tokenizer.encode(load_text("validation"))
        return lambda n: text[(s := int(rng.integers(0, len(text) - n - 1))):s + n]
    if vocab_size is None:
        raise ValueError("pass a tokenizer (text from the corpus) or vocab_size (random token ids)")
    return lambda n: rng.integers(1, vocab_size, n).tolist()


def shared_prompt_requests(num_requests: int, *, system_len: int = 256, question_len: int = 32, num_systems: int = 1,
                           tokenizer=None, vocab_size: int | None = None, seed: int = 0) -> list[list[int]]:
    """Prompts = one of ``num_systems`` system prompts of ``system_len`` tokens (drawn uniformly) + a question
    of ``question_len`` tokens of its own."""
    tokens = _token_source(tokenizer, vocab_size, seed)
    systems = [tokens(system_len) for _ in range(num_systems)]
    pick = np.random.default_rng(seed + 1).integers(0, num_systems, num_requests)
    return [systems[i] + tokens(question_len) for i in pick]


@dataclass
class Conversation:
    """A chat: a system prompt, the user's messages, and (scripted or generated) replies."""

    system: list[int]
    user_messages: list[list[int]]
    replies: list[list[int]] = field(default_factory=list)

    def prompt(self, turn: int) -> list[int]:
        """What turn ``turn`` sends: the system prompt, then user message / reply pairs, then user message ``turn``."""
        if turn > len(self.replies):
            raise ValueError(f"turn {turn} needs the replies of turns 0 ... {turn - 1}; {len(self.replies)} are known")
        out = list(self.system)
        for t in range(turn):
            out += self.user_messages[t] + self.replies[t]
        return out + self.user_messages[turn]


def chat_conversations(num_conversations: int, num_turns: int, *, system_len: int = 64, user_len: int = 24,
                       reply_len: int | None = 32, num_systems: int = 1, tokenizer=None, vocab_size: int | None = None,
                       seed: int = 0) -> list[Conversation]:
    """Conversations sharing ``num_systems`` system prompts. With ``reply_len`` the replies are scripted (text
    of that length: for simulations); with None they are left empty, for the engine to generate turn by turn."""
    tokens = _token_source(tokenizer, vocab_size, seed)
    systems = [tokens(system_len) for _ in range(num_systems)]
    convs = []
    for c in range(num_conversations):
        conv = Conversation(systems[c % num_systems], [tokens(user_len) for _ in range(num_turns)])
        if reply_len is not None:
            conv.replies = [tokens(reply_len) for _ in range(num_turns)]
        convs.append(conv)
    return convs


def chat_requests(conversations: list[Conversation]) -> list[tuple[list[int], list[int]]]:
    """(prompt, reply) of every turn, round by round: turn 0 of every conversation, then turn 1, ... (between two
    turns of one conversation, every other conversation speaks: what makes a small cache forget)."""
    num_turns = min(len(c.replies) for c in conversations)
    return [(c.prompt(t), c.replies[t]) for t in range(num_turns) for c in conversations]


def simulate_prefix_cache(requests, *, num_blocks: int, block_size: int = 16, cache_cls=PrefixCache) -> dict:
    """Replay requests (prompt token lists, or (prompt, reply) pairs) one at a time through a prefix-caching
    block manager of ``num_blocks`` blocks. Returns the totals, the hit rate, the cached tokens of every request
    and the block manager (its cache holds what is left at the end)."""
    bm = PrefixCachingBlockManager(num_blocks, block_size, cache_cls=cache_cls)
    cached_per_request, prompt_tokens = [], 0
    for i, request in enumerate(requests):
        prompt, reply = (request, []) if isinstance(request[0], (int, np.integer)) else request
        tokens = list(prompt) + list(reply)
        # the last prompt token is always computed
        cached_per_request.append(bm.allocate_with_prefix(i, prompt[:-1], len(tokens)))
        bm.cache_blocks(i, tokens)
        bm.free(i)
        prompt_tokens += len(prompt)
    total_cached = sum(cached_per_request)
    return dict(num_requests=len(requests), prompt_tokens=prompt_tokens, cached_tokens=total_cached,
                computed_tokens=prompt_tokens - total_cached, hit_rate=total_cached / max(prompt_tokens, 1),
                cached_per_request=cached_per_request, num_evicted_blocks=bm.num_evicted_blocks,
                num_cached_blocks=len(bm.prefix_cache), block_manager=bm)


def tree_layout(cache: PrefixCache) -> dict[int, tuple[float, int]]:
    """(x, depth) of every node of a tree cache, the root as block -1: leaves side by side, parents centred."""
    pos, next_x = {}, [0]

    def place(node):
        kids = sorted(node.children.values(), key=lambda n: n.block_id)
        if not kids:
            pos[node.block_id] = (float(next_x[0]), node.depth)
            next_x[0] += 1
        else:
            for k in kids:
                place(k)
            pos[node.block_id] = (sum(pos[k.block_id][0] for k in kids) / len(kids), node.depth)

    place(cache.root)
    return pos


def draw_tree(cache: PrefixCache, ax, *, label=None, title: str = "", new_blocks=(), legend: bool = True) -> None:
    """Draw a tree cache on a matplotlib axis: one box per cached block (label(node) -> text, default the block
    id), coloured by state: in use by a sequence (reference count > 1), cached and unused (evictable), or
    ``new_blocks`` (just inserted)."""
    pos = tree_layout(cache)
    ref_counts = cache.allocator.ref_counts
    for node in cache.nodes.values():
        (x0, y0), (x1, y1) = pos[node.parent.block_id], pos[node.block_id]
        ax.plot([x0, x1], [-y0, -y1], color="0.6", lw=1, zorder=1)
    ax.scatter([pos[-1][0]], [0], s=120, color="k", zorder=2)
    ax.annotate("root", (pos[-1][0], 0), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8)
    for node in cache.nodes.values():
        x, d = pos[node.block_id]
        shared = ref_counts[node.block_id] > 1
        color = "tab:orange" if node.block_id in new_blocks else ("tab:blue" if shared else "tab:green")
        text = label(node) if label else str(node.block_id)
        ax.text(x, -d, text, ha="center", va="center", fontsize=7, zorder=3,
                bbox=dict(boxstyle="round,pad=0.25", fc=color, ec="none", alpha=0.35))
    depth = max((n.depth for n in cache.nodes.values()), default=1)
    width = max((x for x, _ in pos.values()), default=0)
    ax.set_xlim(-0.7, width + 0.7)
    ax.set_ylim(-depth - 0.6, 0.6)
    ax.set_xticks([])
    ax.set_yticks([-d for d in range(depth + 1)], [f"{d * cache.block_size}" for d in range(depth + 1)])
    ax.set_ylabel("prefix length (tokens)")
    ax.set_title(title, fontsize=9)
    if legend:
        from matplotlib.patches import Patch

        states = [("tab:blue", "in use (ref count > 1)"), ("tab:green", "cached, unused (evictable)")]
        states += [("tab:orange", "just inserted")] if new_blocks else []
        ax.legend(handles=[Patch(color=c, alpha=0.35, label=t) for c, t in states], fontsize=7, loc="lower left")
