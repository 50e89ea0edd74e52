"""Checks of lesson 06 (speculative decoding): the acceptance test, the residual distribution, the cache
rollback, and the expected number of tokens per target forward pass.

Each check runs the learner's code on hand-made edge cases first, then random ones (fixed seeds), and stops at
the first failure with the case, expected vs got, and a hint aimed at the usual mistake.
"""
from __future__ import annotations

import functools
import math
import numbers
import random

import torch

from course_lib.grading.core import Checker, CheckResult
from course_lib.model.kv_cache import KVCache
from course_lib.serving.speculative import (SpeculativeStats, count_accepted, expected_tokens_per_step,
                                    residual_distribution, rollback_caches, speculative_step)


def _leading(flags) -> int:
    """How many leading entries are true."""
    n = 0
    while n < len(flags) and flags[n]:
        n += 1
    return n


def _as_number(x):
    return x.item() if isinstance(x, torch.Tensor) and x.numel() == 1 else x


# ---------------------------------------------------------------- exercise 1: the acceptance test
def _acceptance_cases():
    q = torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]])
    p = torch.tensor([[0.25, 0.75], [0.0, 1.0], [1.0, 0.0], [0.5, 0.5]])
    cases = [  # (description, drafts, q, p, uniforms)
        ("one token, p ≥ q: always accepted", [1], q[:1], p[:2], torch.tensor([0.99])),
        ("one token, p/q = 0.5, u = 0.3", [0], q[:1], p[:2], torch.tensor([0.3])),
        ("one token, p/q = 0.5, u = 0.7", [0], q[:1], p[:2], torch.tensor([0.7])),
        ("u exactly equals p/q = 0.5", [0], q[:1], p[:2], torch.tensor([0.5])),
        ("p(x) = 0 and u = 0: a token the target never says", [0, 0], q[:2], p[:3], torch.tensor([0.1, 0.0])),
        ("the 1st token is rejected but the 2nd would pass", [0, 1, 1], q, p, torch.tensor([0.9, 0.1, 0.1])),
        ("all three pass", [1, 1, 0], torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.9, 0.1]]), p,
         torch.tensor([0.9, 0.2, 0.9])),
        ("no draft tokens (γ = 0)", [], q[:0], p[:1], torch.tensor([])),
    ]
    rng = torch.Generator().manual_seed(6)
    for k in range(12):
        gamma, V = 1 + k % 8, 3 + 7 * k
        qs = torch.softmax(torch.randn(gamma, V, generator=rng) * 2, -1)
        ps = torch.softmax(torch.randn(gamma + 1, V, generator=rng) * 2, -1)
        drafts = [int(torch.multinomial(qs[i], 1, generator=rng)) for i in range(gamma)]
        cases.append((f"random, γ={gamma}, V={V}", drafts, qs, ps, torch.rand(gamma, generator=rng)))
    return cases


def check_count_accepted(student_fn) -> CheckResult:
    """count_accepted(draft_tokens, draft_probs [γ, V], target_probs [γ+1, V], uniforms [γ]) == the number of
    leading draft tokens with u_i < p_i(x_i) / q_i(x_i)."""
    with Checker("count_accepted", points=2) as c:
        for name, drafts, q, p, u in _acceptance_cases():
            got = _as_number(student_fn(list(drafts), q.clone(), p.clone(), u.clone()))
            want = count_accepted(drafts, q, p, u)
            case = f"{name}: draft_tokens={drafts}, uniforms={[round(float(v), 3) for v in u]}"
            c.check(isinstance(got, numbers.Integral) and not isinstance(got, bool), case=case,
                    expected=f"an int (a number of tokens), {want}", got=f"{type(got).__name__}: {got!r}",
                    hint="return an int, the number of accepted draft tokens: it slices the drafts "
                         "(draft_tokens[:n]); a float or a bool is not a count")
            ratio_test = [(float(u[i]) * float(q[i, x]), float(p[i, x])) for i, x in enumerate(drafts)]  # (u·q, p)
            if got != want and want == len(drafts) and got == want + 1:
                hint = ("count only the accepted DRAFT tokens: the bonus token the target samples after them is not "
                        "a draft (it comes from target_probs[γ], the row after the last draft)")
            elif got != want and len(drafts) and got == _leading([float(u[i]) * float(q[i, x]) < float(p[i + 1, x])
                                                                  for i, x in enumerate(drafts)]):
                hint = ("row i of target_probs is the target's distribution FOR draft i (it predicts position i), "
                        "not row i + 1: compare p = target_probs[i] with q = draft_probs[i]")
            elif got != want and got == sum(uq < px for uq, px in ratio_test):
                hint = ("stop at the FIRST rejection: the tokens after it were drafted from a context the target "
                        "rejected")
            elif got != want and got == _leading([uq <= px for uq, px in ratio_test]):
                hint = "accept when u < p/q, strictly: with u = 0 and p(x) = 0 the target never says x, reject it"
            elif got != want and got == _leading([float(u[i]) * float(p[i, x]) < float(q[i, x])
                                                  for i, x in enumerate(drafts)]):
                hint = "the ratio is p/q (target over draft): tokens the target likes more than the draft always pass"
            else:
                hint = ("walk the draft tokens left to right: token i passes when uniforms[i] < p_i(x_i) / q_i(x_i), "
                        "with p = target_probs[i], q = draft_probs[i], x_i = draft_tokens[i]; return how many passed "
                        "before the first failure")
            c.check_equal(got, want, case=case, hint=hint)
    return c.result


# ---------------------------------------------------------------- exercise 2: the residual distribution
def check_residual_distribution(student_fn) -> CheckResult:
    """residual_distribution(p [V], q [V]) == max(0, p − q) / Σ max(0, p − q) (p itself when p == q)."""
    cases = [("p = [0.5, 0.3, 0.2, 0], q = [0.1, 0.5, 0.2, 0.2]", torch.tensor([0.5, 0.3, 0.2, 0.0]),
              torch.tensor([0.1, 0.5, 0.2, 0.2])),
             ("two tokens with positive residual", torch.tensor([0.4, 0.4, 0.2, 0.0]),
              torch.tensor([0.1, 0.2, 0.3, 0.4])),
             ("disjoint supports: the residual is p", torch.tensor([0.0, 0.0, 0.6, 0.4]),
              torch.tensor([0.7, 0.3, 0.0, 0.0])),
             ("one-hot (greedy): the residual is the target's token", torch.tensor([0.0, 1.0, 0.0]),
              torch.tensor([1.0, 0.0, 0.0]))]
    rng = torch.Generator().manual_seed(60)
    for V in (5, 17, 2048):
        cases.append((f"random, V={V}", torch.softmax(torch.randn(V, generator=rng), -1),
                      torch.softmax(torch.randn(V, generator=rng), -1)))
    cases.append(("p == q (never sampled from: return p)", cases[-1][1], cases[-1][1].clone()))
    with Checker("residual_distribution", points=2) as c:
        for name, p, q in cases:
            got = student_fn(p.clone(), q.clone())
            want = residual_distribution(p, q)
            if isinstance(got, torch.Tensor) and got.shape == want.shape and got.is_floating_point():
                g = got.detach().double()
                signed = float((p - q).sum())
                if (torch.isinf(g).any() or torch.isnan(g).any()) and not torch.equal(p, q):
                    hint = (f"normalize by Σ max(0, p − q), not by Σ (p − q) = {signed:.2g}: p and q both sum to 1, so "
                            "the signed sum is 0 (up to rounding)")
                elif torch.isnan(g).any():
                    hint = "p == q leaves nothing: Σ max(0, p − q) = 0, and 0/0 is NaN; return p in that case"
                elif (g < -1e-7).any():
                    hint = "clamp at zero: max(0, p − q) (torch.clamp(p - q, min=0)); probabilities are never negative"
                elif float(g.max()) > 1 + 1e-4:
                    hint = (f"normalize by Σ max(0, p − q), not by Σ (p − q) = {signed:.2g}: p and q both sum to 1, so "
                            "the signed sum is 0 (up to rounding)")
                elif not math.isclose(float(g.sum()), 1.0, abs_tol=1e-4):
                    hint = f"normalize: the entries sum to {float(g.sum()):.4g}, divide by Σ max(0, p − q)"
                elif torch.allclose(g, ((p - q).abs() / (p - q).abs().sum()).double(), atol=1e-6):
                    hint = ("max(0, p − q), not |p − q|: where the draft has MORE mass than the target, the residual "
                            "is 0 (those tokens were already offered, and rejected in proportion)")
                elif torch.allclose(g, residual_distribution(q, p).double(), atol=1e-6):
                    hint = "it is max(0, p − q): the mass the TARGET has and the draft lacks, not the other way round"
                else:
                    hint = "residual = max(0, p − q) / Σ max(0, p − q)"
            else:
                hint = "return a float tensor of the shape of p"
            c.check_close(got, want, case=name, rtol=1e-5, atol=1e-6, hint=hint)
    return c.result


# ---------------------------------------------------------------- exercise 3: the cache rollback
@functools.lru_cache(maxsize=1)
def _pair_and_prompts():
    from course_lib import load_tiny
    from course_lib.model.corpus import load_text

    target, tok = load_tiny("target", dtype=torch.float32, device="cpu")
    draft, _ = load_tiny("draft", dtype=torch.float32, device="cpu")
    ids = tok.encode(load_text("validation"))
    return target, draft, [ids[:16], ids[30_000:30_024]]


def check_rollback_caches(student_fn) -> CheckResult:
    """rollback_caches(target_cache, draft_cache, num_tokens), called at the end of every speculative round,
    leaves the target cache with num_tokens − 1 tokens and the draft cache with min(its length, num_tokens − 1);
    with it, speculative decoding reproduces the target's greedy tokens."""
    from course_lib.model.generate import generate

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is as fast, and steady on a busy machine
    with Checker("rollback_caches", points=3, timeout_s=120) as c:
        target, draft, prompts = _pair_and_prompts()
        for temperature, gamma, prompt in [(0.0, 2, prompts[0]), (0.0, 5, prompts[1]), (1.0, 4, prompts[0])]:
            tokens, stats, gen = list(prompt), SpeculativeStats(), torch.Generator().manual_seed(0)
            caches = [KVCache(m.config, 1, 128, dtype=m.dtype, device=m.device) for m in (target, draft)]
            seen = {}

            def rollback(target_cache, draft_cache, num_tokens):
                seen.update(draft_before=draft_cache.length, num_tokens=num_tokens)
                student_fn(target_cache, draft_cache, num_tokens)

            for r in range(8):
                out = speculative_step(target, draft, tokens, *caches, gamma, temperature, gen, stats,
                                       rollback=rollback)
                tokens += out
                case = (f"temperature={temperature}, γ={gamma}, round {r}: {len(out) - 1} of {gamma} drafts accepted, "
                        f"num_tokens={len(tokens)}")
                c.check_equal(caches[0].length, len(tokens) - 1, case=case + " — target cache length", hint=(
                    "the target saw the newest token of the last round and all γ drafts; keep the K/V of the "
                    "num_tokens − 1 tokens that stay (the newest token is fed in the next round): "
                    "target_cache.truncate(num_tokens - 1)"))
                c.check_equal(caches[1].length, min(seen["draft_before"], len(tokens) - 1),
                              case=case + " — draft cache length",
                              hint=("roll the draft back too, or it drafts from a context with rejected tokens in it "
                                    "(the output stays right, the acceptance rate drops); it never fed its last "
                                    "proposal, so when all γ are accepted it holds fewer than num_tokens − 1: "
                                    "draft_cache.truncate(min(draft_cache.length, num_tokens - 1))"))
            if temperature == 0:
                want = generate(target, prompt, len(tokens) - len(prompt)).token_ids
                c.check_equal(tokens[len(prompt):], want,
                              case=f"γ={gamma}: greedy speculative tokens vs the target's greedy tokens",
                              hint="after a correct rollback the output equals plain greedy decoding of the target")
    torch.set_num_threads(threads)
    return c.result


# ---------------------------------------------------------------- exercise 4: tokens per target step
def check_expected_tokens(student_fn) -> CheckResult:
    """expected_tokens(alpha, gamma) == (1 − α^(γ+1)) / (1 − α), and γ + 1 at α = 1."""
    rng = random.Random(66)
    cases = [(0.0, 1), (0.0, 4), (0.5, 1), (0.5, 2), (0.8, 4), (0.9, 8), (1.0, 1), (1.0, 5)]
    cases += [(round(rng.uniform(0, 0.99), 3), rng.randint(1, 16)) for _ in range(8)]
    with Checker("expected_tokens", points=1) as c:
        for alpha, gamma in cases:
            got = _as_number(student_fn(alpha, gamma))
            want = expected_tokens_per_step(alpha, gamma)
            if (alpha < 1 and isinstance(got, float)
                    and math.isclose(got, (1 - alpha ** gamma) / (1 - alpha), rel_tol=1e-9)):
                hint = "count the target's own token too: 1 + α + ... + α^γ has γ + 1 terms, so α^(γ+1)"
            elif alpha < 1 and isinstance(got, float) and math.isclose(got, 1 / (1 - alpha), rel_tol=1e-9):
                hint = ("1 / (1 − α) is the limit for γ → ∞; with γ drafts the sum stops at α^γ: "
                        "(1 − α^(γ+1)) / (1 − α)")
            elif alpha == 1:
                hint = "at α = 1 every draft is accepted: γ drafts + 1 bonus token (the formula is 0/0 there)"
            else:
                hint = ("E[tokens] = Σ_{k=0..γ} α^k = (1 − α^(γ+1)) / (1 − α): token k+1 arrives if the first k "
                        "drafts pass")
            c.check_close(got, want, case=f"alpha={alpha}, gamma={gamma}", rtol=1e-9, atol=1e-12, hint=hint)
    return c.result


# ---------------------------------------------------------------- end to end: a greedy speculative decode
_PIECES = ("count_accepted", "rollback_caches")
_E2E_DECODES = [(0, 2, 24), (1, 4, 24)]      # (prompt, γ, new tokens) of the speculative loop
_E2E_ENGINE = dict(block_size=8, num_speculative_tokens=3, max_num_seqs=4, use_kernels=False)
_E2E_ENGINE_PROMPTS = [(0, 16), (1, 12), (0, 20)]   # (prompt, max_tokens) of the engine run; prompt 2 = 0's first half


class _PieceError(Exception):
    """A function returned something a speculative round cannot use: the message names it."""


def _greedy_accept(count_fn, drafted: list[int], best: list[int], vocab_size: int, gen: torch.Generator) -> int:
    """The learner's count_accepted on a greedy round: q and p are one-hot (the draft's token, the target's argmax),
    so a draft passes the test u < p/q exactly when it is the target's argmax, whatever u."""
    gamma = len(drafted)
    q = torch.nn.functional.one_hot(torch.tensor(drafted, dtype=torch.long), vocab_size).float().reshape(gamma,
                                                                                               vocab_size)
    p = torch.nn.functional.one_hot(torch.tensor(best, dtype=torch.long), vocab_size).float()
    got = _as_number(count_fn(list(drafted), q, p, torch.rand(gamma, generator=gen)))
    if not (isinstance(got, numbers.Integral) and not isinstance(got, bool) and 0 <= got <= gamma):
        raise _PieceError(f"count_accepted(draft_tokens={drafted}, ...) with the target's argmaxes {best} returned "
                          f"{got!r}: expected an int in 0 ... {gamma}, the number of accepted DRAFT tokens (the bonus "
                          "token is not one of them)")
    return int(got)


def _check_lengths(target_len: int, draft_len: int, num_tokens: int, r: int, n: int, gamma: int) -> None:
    """Neither cache may keep K/V past the tokens that stay: a rejected draft's, or the newest token's (the next
    round feeds it)."""
    where = (f"round {r} ({n} of {gamma} drafts accepted): rollback_caches(target_cache, draft_cache, "
             f"num_tokens={num_tokens}) left the")
    if target_len > num_tokens - 1:
        raise _PieceError(f"{where} target cache with {target_len} tokens: keep the K/V of the num_tokens - 1 tokens "
                          "that stay (the newest is fed in the next round): target_cache.truncate(num_tokens - 1)")
    if draft_len > num_tokens - 1:
        raise _PieceError(f"{where} draft cache with {draft_len} tokens, K/V of rejected drafts among them: roll the "
                          "draft back too, draft_cache.truncate(min(draft_cache.length, num_tokens - 1))")


def speculative_greedy(count_fn, rollback_fn, decodes=_E2E_DECODES):
    """Greedy speculative decoding of the shipped tiny pair (float32), one sequence at a time, as
    ``speculative_generate`` runs it, with the learner's ``count_accepted`` verifying each round and their
    ``rollback_caches`` ending it (None: the library's). Returns {"tokens": [...], "accepted": [per round]} per
    decode, or {"error": message}. Runs where the learner's code lives (the grader runs it in the notebook's
    kernel)."""
    count_fn, rollback_fn = count_fn or count_accepted, rollback_fn or rollback_caches
    target, draft, prompts = _pair_and_prompts()
    V, gen, results = target.config.vocab_size, torch.Generator().manual_seed(0), []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # tiny models: one thread is as fast, and steady when other processes run
    try:
        with torch.no_grad():
            for index, gamma, max_new in decodes:
                prompt = prompts[index]
                total = len(prompt) + max_new
                t_cache, d_cache = (KVCache(m.config, 1, total, dtype=m.dtype, device=m.device)
                                    for m in (target, draft))
                tokens, accepted = list(prompt), []
                while len(tokens) < total:
                    g = min(gamma, total - len(tokens) - 1)   # never propose past the last token
                    drafted = []
                    for _ in range(g):
                        new = (tokens + drafted)[d_cache.length:]
                        drafted.append(int(draft(torch.tensor([new]), cache=d_cache, last_token_only=True)[0, -1]
                                           .argmax()))
                    logits = target(torch.tensor([(tokens + drafted)[t_cache.length:]]), cache=t_cache)[0, -(g + 1):]
                    best = logits.argmax(-1).tolist()
                    n = _greedy_accept(count_fn, drafted, best, V, gen)
                    out = drafted[:n] + [best[n]]
                    accepted.append(n)
                    rollback_fn(t_cache, d_cache, len(tokens) + len(out))
                    tokens += out
                    _check_lengths(t_cache.length, d_cache.length, len(tokens), len(accepted) - 1, n, g)
                results.append({"tokens": tokens[len(prompt):], "accepted": accepted})
    except _PieceError as err:
        return {"error": str(err)}
    finally:
        torch.set_num_threads(threads)
    return results


def speculative_engine(count_fn, speculative=True):
    """``LLMEngine(target, speculative_model=draft, num_speculative_tokens=3)`` serving a few greedy requests
    together, its verification done by the learner's ``count_accepted`` (None: the library's greedy verify);
    ``speculative=False``: the engine without a draft. Returns {"tokens": [...], "accepted": [per round]} or
    {"error": message}."""
    from course_lib.model.sampling import SamplingParams
    from course_lib.serving.engine import LLMEngine

    target, draft, prompts = _pair_and_prompts()
    requests = [(prompts[i] if k < 2 else prompts[i][:8], n) for k, (i, n) in enumerate(_E2E_ENGINE_PROMPTS)]
    if not speculative:
        engine = LLMEngine(target, block_size=8, max_num_seqs=4, use_kernels=False)
    else:
        engine = LLMEngine(target, speculative_model=draft, **_E2E_ENGINE)
        if count_fn is not None:
            new_run, gen = engine._new_run, torch.Generator().manual_seed(0)

            def learner_run():
                new_run()
                spec = engine._spec

                def verify(seq, drafted, q_rows, logits, best):
                    n = _greedy_accept(count_fn, drafted, best, target.config.vocab_size, gen)
                    spec.stats.record_round(len(drafted), n, n)
                    return drafted[:n] + [best[n]]
                spec._verify = verify
            engine._new_run = learner_run
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            outs = engine.generate([p for p, _ in requests], [SamplingParams(max_tokens=n) for _, n in requests],
                                   use_tqdm=False)
    except _PieceError as err:
        return {"error": str(err)}
    finally:
        torch.set_num_threads(threads)
    accepted = engine._spec.stats.accepted_per_round if speculative else []
    return {"tokens": [o.token_ids for o in outs], "accepted": list(accepted)}


@functools.lru_cache(maxsize=1)
def _e2e_want():
    """The target's greedy tokens of each decode, the library's accepted counts per round, and the same for the
    engine (its tokens without a draft, its accepted counts with the library's verify)."""
    from course_lib.model.generate import generate

    target, draft, prompts = _pair_and_prompts()
    greedy = [generate(target, prompts[i], n).token_ids for i, _, n in _E2E_DECODES]
    library = speculative_greedy(None, None)
    return greedy, library, speculative_engine(None, speculative=False)["tokens"], speculative_engine(None)


def check_end_to_end(count_fn, rollback_fn) -> CheckResult:
    """Your count_accepted verifies, and your rollback_caches ends, every round of a greedy speculative decode of the
    course's target with its draft (two prompts, γ = 2 and 4, 24 tokens each); your count_accepted also verifies
    the rounds of ``LLMEngine(speculative_model=draft, num_speculative_tokens=3)`` serving three requests together.
    The tokens must be exactly the target's greedy tokens, the drafts accepted in each round those of the library's
    functions, and after each round neither cache may keep K/V past the tokens that stay."""
    from course_lib.grading.remote import run_beside

    with Checker("end_to_end", points=2, timeout_s=120) as c:
        greedy, library, engine_tokens, engine_library = _e2e_want()
        try:
            got = run_beside(count_fn, "course_lib.grading.lesson06:speculative_greedy", count_fn, rollback_fn)
            got_engine = run_beside(count_fn, "course_lib.grading.lesson06:speculative_engine", count_fn)
        except NotImplementedError:
            raise NotImplementedError("Exercise: this check runs exercises 1 and 3 together: finish them "
                                      "first") from None
        for result in (got, got_engine):
            if isinstance(result, dict) and "error" in result:
                c.check(False, expected="values a speculative round can use", got=result["error"],
                        hint="the unit check of that function above shows the rule; here it broke the decode")
        for (index, gamma, n), mine, lib, want in zip(_E2E_DECODES, got, library, greedy):
            case = f"prompt {index}, γ={gamma}, {n} new tokens, greedy, one sequence"
            if (mine["tokens"], mine["accepted"]) == (want, lib["accepted"]):
                c.cases_passed += 1
                continue
            hint = _guilty(count_fn, rollback_fn, library, run_beside)
            c.check_equal(mine["tokens"], want, case=case + ": tokens vs the target's greedy tokens", hint=hint)
            c.check_equal(mine["accepted"], lib["accepted"], case=case + ": drafts accepted per round vs the "
                          "library's", hint=hint)
        case = (f"LLMEngine, {len(_E2E_ENGINE_PROMPTS)} requests together, num_speculative_tokens="
                f"{_E2E_ENGINE['num_speculative_tokens']}, your count_accepted")
        hint = "the engine verifies with your count_accepted: a draft passes exactly when it is the target's argmax"
        c.check_equal(got_engine["tokens"], engine_tokens, case=case + ": tokens vs the engine without a draft",
                      hint=hint)
        c.check_equal(got_engine["accepted"], engine_library["accepted"], case=case + ": drafts accepted per round "
                      "vs the library's", hint=hint)
    return c.result


def _guilty(count_fn, rollback_fn, library, run_beside) -> str:
    """Runs each function alone with the library's other one: the hint names the one that changes the decode."""
    mine = (count_fn, rollback_fn)
    guilty = [name for k, name in enumerate(_PIECES)
              if run_beside(count_fn, "course_lib.grading.lesson06:speculative_greedy",
                            *[p if j == k else None for j, p in enumerate(mine)]) != library]
    if not guilty:
        return "each of your functions decodes right with the library's other one, but not together"
    return (f"with the library's other function, your {guilty[0]} alone already changes the decode: "
            + _E2E_HINTS[guilty[0]])


_E2E_HINTS = {
    "count_accepted": "in a greedy round p and q are one-hot, so a draft passes exactly when it is the target's "
                      "argmax; count the drafts up to the FIRST that fails",
    "rollback_caches": "both caches keep the first num_tokens - 1 tokens (the draft fewer when it never fed its last "
                       "proposal)",
}
