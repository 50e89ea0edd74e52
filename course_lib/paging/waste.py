"""How much KV-cache memory each layout wastes, on a realistic request-length distribution, and a picture of
block tables (lesson 02).

Request lengths: ``SHAREGPT`` holds the mean prompt and output lengths of the ShareGPT conversations that
the vLLM paper reports (Kwon et al., "Efficient Memory Management for Large Language Model Serving with
PagedAttention", SOSP 2023, Fig. 11: ShareGPT input mean 161.31 tokens, output mean 337.99 tokens). The paper
gives means and histograms, not a fitted distribution: the **log-normal shape and its spread sigma are our
modelling assumption** (lengths are positive and right-skewed), chosen to match those means.
"""
from __future__ import annotations

import numpy as np

#: Published means (vLLM paper, Fig. 11, ShareGPT); the log-normal sigma is an assumption of this course.
SHAREGPT = dict(prompt_mean=161.31, output_mean=337.99, sigma=1.0,
                source="Kwon et al., SOSP 2023 (vLLM), Fig. 11: ShareGPT mean input 161.31, mean output 337.99 tokens")


def sample_request_lengths(num_requests: int, *, prompt_mean: float = SHAREGPT["prompt_mean"],
                           output_mean: float = SHAREGPT["output_mean"], sigma: float = SHAREGPT["sigma"],
                           max_len: int = 2048, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Prompt and output lengths (int arrays), each log-normal with the given mean (mu = ln(mean) - sigma²/2).
    Prompts are capped at max_len - 1 and outputs so that prompt + output <= max_len (generation stops there)."""
    rng = np.random.default_rng(seed)
    prompt = rng.lognormal(np.log(prompt_mean) - sigma**2 / 2, sigma, num_requests)
    output = rng.lognormal(np.log(output_mean) - sigma**2 / 2, sigma, num_requests)
    prompt = np.clip(np.round(prompt), 1, max_len - 1).astype(int)
    output = np.clip(np.round(output), 1, max_len - prompt).astype(int)
    return prompt, output


def tokens_held(prompt: np.ndarray, output: np.ndarray, progress: np.ndarray | float = 1.0) -> np.ndarray:
    """Tokens whose K/V exist when a fraction ``progress`` of each output has been generated."""
    return prompt + np.floor(np.asarray(progress) * output).astype(int)


def reserved_slots(prompt: np.ndarray, output: np.ndarray, layout: str, *, progress: np.ndarray | float = 1.0,
                   max_len: int = 2048, block_size: int = 16) -> np.ndarray:
    """Token slots each request holds under a layout:

    * ``"max"``    contiguous, preallocated for the longest possible sequence (max_len)
    * ``"pow2"``   contiguous, the prompt plus the true output length rounded up to a power of two (the vLLM
      paper's "Orca (Pow2)": an output of 25 tokens gets 32 slots; needs to know the future)
    * ``"oracle"`` contiguous, exactly the true final length (an oracle: still reserved from the start)
    * ``"paged"``  blocks of block_size allocated on demand: ceil(tokens held / P) blocks
    """
    final = prompt + output
    if layout == "max":
        return np.full_like(prompt, max_len)
    if layout == "pow2":
        return prompt + 2 ** np.ceil(np.log2(np.maximum(output, 1))).astype(int)
    if layout == "oracle":
        return final
    if layout == "paged":
        return -(-tokens_held(prompt, output, progress) // block_size) * block_size
    raise ValueError(f"unknown layout {layout!r}; expected 'max', 'pow2', 'oracle' or 'paged'")


def waste_fraction(prompt: np.ndarray, output: np.ndarray, layout: str, **kwargs) -> float:
    """1 - (slots holding real K/V) / (slots reserved), summed over all requests."""
    held = tokens_held(prompt, output, kwargs.get("progress", 1.0))
    return 1.0 - held.sum() / reserved_slots(prompt, output, layout, **kwargs).sum()


# ---------------------------------------------------------------- a picture of block tables
def draw_block_tables(ax, block_manager, names: dict[int, str] | None = None, title: str = "") -> None:
    """Logical blocks of every sequence (left) and the physical blocks they map to (right), with arrows.
    Colors: one per sequence; a block owned by several sequences (ref count > 1) is hatched and gray;
    the filled part of each sequence's last block is drawn to scale."""
    import matplotlib.patches as patches

    bm, P = block_manager, block_manager.block_size
    seqs = sorted(bm.block_tables)
    names = names or {s: f"seq {s}" for s in seqs}
    colors = {s: f"C{i}" for i, s in enumerate(seqs)}
    N = bm.allocator.num_blocks
    cols = min(N, 12)
    top = -len(seqs) * 1.4 - 1.6           # the physical blocks sit below the block tables
    owner = {b: s for s in seqs for b in bm.block_tables[s]}
    for b in range(N):                     # physical blocks
        x, y = (b % cols) * 1.2, top - (b // cols) * 1.3
        shared = bm.allocator.ref_counts[b] > 1
        face = "lightgray" if shared else (colors[owner[b]] if b in owner else "white")
        ax.add_patch(patches.Rectangle((x, y), 1, 1, facecolor=face, edgecolor="black", alpha=0.8 if b in owner else 1,
                                       hatch="//" if shared else None))
        ax.text(x + 0.5, y + 0.62, f"{b}", ha="center", va="center", fontsize=7)
        if shared:
            ax.text(x + 0.5, y + 0.25, f"ref {bm.allocator.ref_counts[b]}", ha="center", va="center", fontsize=6)
    for r, s in enumerate(seqs):           # logical blocks, one row per sequence
        y = -r * 1.4
        ax.text(-0.3, y + 0.5, names[s], ha="right", va="center", fontsize=8)
        table, n = bm.block_tables[s], bm.num_tokens[s]
        for j, b in enumerate(table):
            filled = min(P, n - j * P) / P
            ax.add_patch(patches.Rectangle((j * 1.2, y), 1, 1, facecolor="white", edgecolor="black"))
            ax.add_patch(patches.Rectangle((j * 1.2, y), filled, 1, facecolor=colors[s], alpha=0.6))
            ax.text(j * 1.2 + 0.5, y + 0.5, f"→{b}", ha="center", va="center", fontsize=7)
            bx, by = (b % cols) * 1.2, top - (b // cols) * 1.3
            ax.annotate("", xy=(bx + 0.5, by + 1), xytext=(j * 1.2 + 0.5, y),
                        arrowprops=dict(arrowstyle="->", color=colors[s], alpha=0.6, lw=0.8))
    ax.text(-0.3, 1.3, f"block tables: logical block j of each sequence -> physical block (P = {P} tokens; "
            "colored part = filled)", ha="left", fontsize=8)
    ax.text(-0.3, top - (-(-N // cols) - 1) * 1.3 - 0.6, f"physical KV blocks 0 ... {N - 1} (white = free, "
            "hatched = shared)", ha="left", fontsize=8)
    ax.set_xlim(-3.5, max(cols, max([len(bm.block_tables[s]) for s in seqs] + [1])) * 1.2 + 0.3)
    ax.set_ylim(top - (-(-N // cols) - 1) * 1.3 - 1.0, 1.8)
    ax.set_aspect("equal")
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=10)
