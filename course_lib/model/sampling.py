"""Sampling parameters of a request, and how one next token is drawn from its logits (lesson 04).

``SamplingParams`` is a validated dataclass (the names are vLLM's): a bad value raises a ``ValueError`` that
names the field when the object is built, so a wrong request never reaches the engine's batch.

**Seeded draws that no batch can change.** A draw is an *exponential race* (the Gumbel-max trick in another
guise): every token x gets a random time E_x ~ Exp(1), and the token with the largest p_x / E_x wins, which
happens with probability exactly p_x. The noise E of output token t of a sequence is *counter-based*
(``course_lib.model.noise``): a hash of (the sequence's seed, t, x) (``token_generator``), never a stream that
other draws advance. So a request's tokens depend on its seed and its logits only: not on which requests share
its steps, how a prompt was chunked, whether it was preempted, nor (``course_lib.serving.spec_decode``) on how
many draft tokens a step verified.

**On the device, for the whole batch.** ``sample_tokens`` draws the next token of every row of a step at once, on
the logits' device: one stable sort for every row's top-k / top-p, the noise of every (seed, position) as one
batched hash, the race, the argmax of the greedy rows. The seeds and positions are known on the host when the
step is planned, so nothing waits for the device: with asynchronous scheduling a step with seeded sampling rows
launches without draining the step in flight, as a greedy one does (``course_lib.serving.async_scheduling``).
``sample_token`` / ``draw`` (one row, what the lessons show) give the token of that row in any batch.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from course_lib.model.noise import MAX_POSITION, exponential_noise

#: Temperatures below this count as greedy (vLLM's ``_SAMPLING_EPS``): logits / 1e-310 overflow to inf, and the
#: softmax of that is NaN.
SAMPLING_EPS = 1e-5
#: Seeds are non-negative 63-bit ints, the range of ``random.Random.getrandbits(63)`` and of a torch seed.
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class SamplingParams:
    """How to generate the completion(s) of one request.

    temperature      0 = greedy (argmax); > 0 samples from softmax(logits / temperature). A finite number >= 0;
                     below SAMPLING_EPS = 1e-5 it is greedy too (vLLM's rule: the division would overflow)
    top_p            nucleus sampling: keep the smallest set of tokens whose probabilities sum to >= top_p (1 = all)
    top_k            keep the top_k most likely tokens (None = all)
    max_tokens       generate at most this many tokens (fewer at a stop token or at the model's context length)
    stop_token_ids   stop after generating one of these (it is kept in the output); () = never stop early
    seed             an int in [0, 2**63 - 1]: the request's tokens depend on it and on the logits only, never on
                     the batch (see the module docstring); None: the engine draws one
    n                number of completions of the prompt (each sampled independently; sample i uses seed + i)

    Passed to the engine as a dict, the keys must be these names: an unknown key (a typo such as ``temprature``)
    is refused, not ignored.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None
    max_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    n: int = 1

    def __post_init__(self):
        def is_int(x):
            return isinstance(x, numbers.Integral) and not isinstance(x, bool)

        t = self.temperature
        if not isinstance(t, numbers.Real) or isinstance(t, bool) or not (math.isfinite(t) and t >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if not isinstance(self.top_p, numbers.Real) or isinstance(self.top_p, bool) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k is not None and (not is_int(self.top_k) or self.top_k < 1):
            raise ValueError(f"top_k must be None or an int >= 1, got {self.top_k!r}")
        if not is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be an int >= 1, got {self.n!r}")
        if self.seed is not None and not (is_int(self.seed) and 0 <= self.seed <= MAX_SEED):
            raise ValueError(f"seed must be None or an int in [0, 2**63 - 1], got {self.seed!r}")
        try:
            stops = tuple(self.stop_token_ids)
        except TypeError:
            raise ValueError(f"stop_token_ids must be a sequence of token ids, got {self.stop_token_ids!r}") from None
        if not all(is_int(t) and t >= 0 for t in stops):
            raise ValueError(f"stop_token_ids must hold ints >= 0, got {self.stop_token_ids!r}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in stops))

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS


def _filter_rows(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor | None,
                 top_p: torch.Tensor | None) -> torch.Tensor:
    """logits [N, V] -> float32 logits / temperature [N], the tokens outside each row's top_k [N] / top_p [N] at
    -inf (None: no row filters). One stable sort for the whole batch; a row with top_k = V and top_p = 1 keeps
    every token."""
    logits = logits.float() / temperature[:, None]
    if top_k is None and top_p is None:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)       # [N, V] each
    if top_k is not None:   # keep what is >= the k-th largest (ties with it stay, as torch.topk's threshold does)
        kth = sorted_logits.gather(1, (top_k - 1)[:, None])                               # [N, 1]
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    drop = sorted_logits == float("-inf")
    if top_p is not None:
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens before it already reach top_p (so the most likely one always stays); a row
        # with top_p = 1 drops nothing (its cumulative sum may round past 1)
        drop |= (probs.cumsum(-1) - probs >= top_p[:, None]) & (top_p[:, None] < 1)
    return logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                  top_p: float = 1.0) -> torch.Tensor:
    """logits [V] -> float32 logits divided by the temperature, with the tokens outside top-k / top-p at -inf
    (the one-row case of the batched filter that ``sample_tokens`` runs: the same bits)."""
    V, device = logits.shape[-1], logits.device
    k = None if top_k is None or top_k >= V else _to_device([top_k], torch.int64, device)
    p = None if top_p >= 1.0 else _to_device([top_p], torch.float32, device)
    return _filter_rows(logits[None], _to_device([temperature], torch.float32, device), k, p)[0]


def race(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The exponential race: probs [N, V], noise E [N, V] -> argmax_x p_x / E_x per row [N] (a token of
    probability 0 never wins)."""
    return torch.where(probs > 0, probs / noise, -1.0).argmax(dim=-1)


@dataclass(frozen=True)
class TokenNoise:
    """The noise of one draw: output token ``position`` of a sequence seeded with ``seed``. Counter-based
    (``course_lib.model.noise``): a key, not a stream; nothing advances when it is used."""

    seed: int
    position: int

    def exponential(self, vocab_size: int, device) -> torch.Tensor:
        """E [V] float32: the same bits as row (seed, position) of any batch."""
        seeds, positions = (torch.tensor([v], dtype=torch.int64, device=device) for v in (self.seed, self.position))
        return exponential_noise(seeds, positions, vocab_size)[0]


def token_generator(seed: int, position: int) -> TokenNoise:
    """The noise of the draw of output token ``position`` of a sequence seeded with ``seed`` (what ``draw`` and
    ``sample_token`` take as their ``generator``): a function of the pair alone."""
    if not (isinstance(seed, numbers.Integral) and 0 <= seed <= MAX_SEED):
        raise ValueError(f"seed must be an int in [0, 2**63 - 1], got {seed!r}")
    if not (isinstance(position, numbers.Integral) and 0 <= position <= MAX_POSITION):
        raise ValueError(f"position must be an int in [0, 2**32 - 1], got {position!r}")
    return TokenNoise(int(seed), int(position))


def draw(probs: torch.Tensor, generator: TokenNoise | torch.Generator | None = None) -> int:
    """One token from probs [V] by an exponential race: argmax_x p_x / E_x with E_x ~ Exp(1), x wins with
    probability p_x. ``generator``: a ``token_generator(seed, position)`` (counter-based noise, computed on probs'
    device: the token ``sample_tokens`` draws for that row), or a ``torch.Generator`` / None (torch's global
    generator), whose stream is advanced: ``torch.multinomial(probs, 1)`` races the same way."""
    probs = probs.float()
    if isinstance(generator, TokenNoise):
        e = generator.exponential(probs.shape[-1], probs.device)                              # [V]
    else:
        probs = probs.cpu()
        e = torch.empty_like(probs).exponential_(generator=generator)                          # [V]
    return int(race(probs[None], e[None])[0])


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a tensor on ``device`` without waiting for the device: to a GPU through pinned memory,
    asynchronously (``torch.tensor(values, device="cuda")`` would wait for every kernel queued before it)."""
    t = torch.tensor(values, dtype=dtype)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def sampling_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """logits [N, V] of sampling rows (temperature > 0), one SamplingParams per row -> the distributions they are
    drawn from, softmax(logits / temperature) with each row's top_k / top_p applied: [N, V] float32."""
    V, device = logits.shape[-1], logits.device
    temperature = _to_device([p.temperature for p in params], torch.float32, device)
    top_k = None if all(p.top_k is None or p.top_k >= V for p in params) else _to_device(
        [V if p.top_k is None else min(p.top_k, V) for p in params], torch.int64, device)
    top_p = None if all(p.top_p >= 1.0 for p in params) else _to_device(
        [p.top_p for p in params], torch.float32, device)
    return torch.softmax(_filter_rows(logits, temperature, top_k, top_p), dim=-1)


def sample_tokens(logits: torch.Tensor, params: Sequence[SamplingParams], seeds: Sequence[int | None],
                  positions: Sequence[int]) -> torch.Tensor:
    """The next token of every row, on the logits' device, in one batched computation: logits [N, V], and per row
    its SamplingParams, its seed (None only for a greedy row) and the position of the output token it draws ->
    token ids [N] (int64). Greedy rows take the argmax; the others race with the counter-based noise of
    (seed, position) over ``sampling_probs``. Nothing waits for the device (no ``.item()``, no ``.tolist()``, the
    per-row numbers go up asynchronously): the ids can be launched and read back later."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        got = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a tensor [N, V], got {got}")
    N, V = logits.shape
    if not len(params) == len(seeds) == len(positions) == N:
        raise ValueError(f"params, seeds and positions need one entry per row of logits ({N}), got "
                         f"{len(params)}, {len(seeds)} and {len(positions)}")
    sampling = [i for i, p in enumerate(params) if not p.greedy]
    greedy_tokens = logits.argmax(dim=-1)                                                      # [N]
    if not sampling:
        return greedy_tokens
    for i in sampling:
        token_generator(_required(seeds[i], i), positions[i])     # a ValueError naming the row's bad seed / position
    device = logits.device
    keys = _to_device([sampling, [seeds[i] for i in sampling], [positions[i] for i in sampling]], torch.int64,
                      device)                                                                # [3, M]: one copy
    rows, seed_rows, position_rows = keys
    probs = sampling_probs(logits[rows], [params[i] for i in sampling])                       # [M, V]
    return greedy_tokens.index_copy(0, rows, race(probs, exponential_noise(seed_rows, position_rows, V)))


def _required(seed, row: int) -> int:
    if seed is None:
        raise ValueError(f"seeds[{row}] is None, but row {row} samples (temperature > 0): a sampling row needs a "
                         "seed (the engine gives every sequence one)")
    return seed


def sample_token(logits: torch.Tensor, params: SamplingParams,
                 generator: TokenNoise | torch.Generator | None = None) -> int:
    """One token id from logits [V]: argmax when greedy, else a draw from the filtered softmax. With a sequence's
    ``token_generator(seed, position)`` this is row 0 of ``sample_tokens`` (the same token as in any batch);
    with a ``torch.Generator`` / None, a draw from that stream."""
    if params.greedy:
        return int(logits.argmax())
    if isinstance(generator, TokenNoise):
        return int(sample_tokens(logits[None], [params], [generator.seed], [generator.position])[0])
    probs = torch.softmax(filter_logits(logits, params.temperature, params.top_k, params.top_p), dim=-1)
    return draw(probs, generator)
