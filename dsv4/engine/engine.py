"""The inference engine: requests in, streamed text out, many sequences decoding together over one cache.

    submit(prompt, ...) -> Request        queued; joins the batch at the next step that has a free cache slot
    step() -> [Delta]                      one scheduling round: a chunk of prefill for new requests (rows of
                                           different lengths in one padded step), then one decode token for every
                                           running request (or draft + verify with MTP speculation)
    cancel(id)                             leaves at the next step; its slot is free at once
    generate(prompts) / stream(prompt)     drive `step` until done

The engine fuses the model's projections that share an input (`dsv4.kernels.fused.prepare_decode`: the weights become
views of one block per group, nothing is copied). Every running request owns one slot of a preallocated `KVCache`; a
finished or cancelled request gives its slot back immediately and the next waiting request takes it (continuous
batching). Each request samples with its own settings and random stream (dsv4.engine.sampling), stops on its own stop
tokens / strings (dsv4.engine.stops) and streams UTF-8-safe text deltas (dsv4.tokenizers.text.StreamDecoder).
Penalties count the generated tokens (not the prompt). A request's state and what it hands back (Request, Delta,
Completion) are in dsv4.engine.request.

MTP speculation (speculative=True, a model with an MTP module): see dsv4.engine.speculation.
"""

import itertools
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

from dsv4.device import can_compile, release_free_memory
from dsv4.engine.budget import StepBudget
from dsv4.engine.guidance import follow, guided_rows
from dsv4.engine.prefix import PrefixCache
from dsv4.engine.request import Completion, Delta, LogitsProcessor, Request, token_logprobs
from dsv4.engine.sampling import SamplingParams, apply_penalties, sample
from dsv4.engine.speculation import Speculation
from dsv4.engine.stops import StopMatcher
from dsv4.model.cache import KVCache, Step
from dsv4.weights.placement import cache_devices, main_device

__all__ = ["Completion", "Delta", "Engine", "Request"]  # the request types live in dsv4.engine.request


class Engine(Speculation):
    TRIM_EVERY = 16384  # prompt tokens between hand-backs of freed memory to the OS during prefill
    def __init__(self, model, tokenizer, max_batch: int = 8, max_len: int | None = None, prefill_chunk: int = 512,
                 speculative: bool = False, cache_dtype: torch.dtype | None = None, compile: bool | str = False,
                 compile_scan: bool | None = None, prefix_cache_gb: float = 0.0, max_step_tokens: int | None = None):
        """compile: False; True (decode, verify and draft steps through torch.compile: the first steps of each batch
        size compile, cached on disk); or "max" (also inductor's C++ wrapper, which launches the step's kernels
        without Python: ~10% faster steps for about twice the compile time; for long-lived engines).
        compile_scan: the lightning indexer's long-context scan through torch.compile (`dsv4.kernels.compile`;
        compiles at the first prefill long enough to scan, a few seconds, cached on disk); None = where a compiler
        exists.
        prefix_cache_gb: keep snapshots of served prefixes within this many GiB and start requests that share one from
        them (dsv4.engine.prefix); 0 = off.
        max_step_tokens: what one step may cost, in positions at no context (default: prefill_chunk): pending
        prompts run in slices that fit beside the decode tokens, shorter at long contexts (dsv4.engine.budget); a
        slice never crosses a multiple of prefill_chunk."""
        if compile not in (False, True, "max"):
            raise ValueError(f"compile must be False, True or 'max', got {compile!r}")
        if speculative and not model.mtp:
            raise ValueError("speculative decoding needs a model with an MTP module (n_mtp_layers >= 1)")
        if max_batch < 1 or prefill_chunk < 1:
            raise ValueError(f"max_batch and prefill_chunk must be >= 1, got {max_batch} and {prefill_chunk}")
        from dsv4.kernels.compile import allow_recompiles
        from dsv4.kernels.compile import compile_scan as compile_indexer_scan
        from dsv4.kernels.fused import prepare_decode

        # projections that share an input fused into one product each; on a CPU, the decode products (fused loops)
        self.model, self.tokenizer = prepare_decode(model.eval()), tokenizer
        self.args = model.args
        # a placed model (dsv4.weights.placement) takes token ids and gives logits on its main device, and each
        # layer's KV cache lives on that layer's device
        placed = getattr(model, "placement", None) is not None
        self.device = main_device(model) if placed else next(model.parameters()).device
        if compile_scan or (compile_scan is None and can_compile(self.device)):
            compile_indexer_scan(model)
        self.max_len = min(max_len or self.args.max_seq_len, self.args.max_seq_len - speculative)
        self.max_batch, self.prefill_chunk, self.speculative = max_batch, prefill_chunk, speculative
        self.budget = StepBudget(self.args, max_step_tokens or prefill_chunk, speculative)
        dtype = cache_dtype or model.layers[0].attn.wkv.dtype  # what the attention computes in
        # a speculative step runs one column (the draft) past the last token that can still be generated
        self.cache = KVCache(self.args, max_batch, self.max_len + speculative, self.device, dtype,
                             devices=cache_devices(model) if placed else None)
        self.free = list(range(max_batch - 1, -1, -1))  # a stack: the lowest slot is reused first
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._cancelled: set[int] = set()
        self._ids = itertools.count()
        self._lock = threading.Lock()  # submit / cancel may come from other threads; step runs in one
        # decode steps (width 1, or 2 when verifying a draft) run the same code compiled when asked: the many small
        # per-token ops fuse and Python leaves the loop; the first steps compile (a minute or two; cached on disk)
        self.compile = bool(compile)
        self._decode_step, self._draft_step = self._decode_logits, self._draft_logits
        if compile:
            # graphs: one per batch size up to 4 (see _compiled) for the decode, verify and draft steps, plus one with
            # a dynamic batch; the length of the compressed entries read becomes dynamic after its first change
            allow_recompiles(32)
            # the model's attributes and weights do not change while it serves: skipping the guards on its modules
            # saves most of the per-step guard checks (the cache and step inputs keep theirs)
            options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
                       "cpp_wrapper": compile == "max"}
            self._decode_step = torch.compile(self._decode_logits, dynamic=None, options=options)
            self._draft_step = torch.compile(self._draft_logits, dynamic=None, options=options)
        self.stats = {"steps": 0, "prefill_tokens": 0, "decode_tokens": 0, "drafted": 0, "accepted": 0,
                      "cached_tokens": 0}  # prompt tokens restored from the prefix cache
        self.prefix = None
        if prefix_cache_gb > 0:  # a slot's state spans the MTP layers too when they run
            layers = self.args.n_layers + (self.args.n_mtp_layers if speculative else 0)
            self.prefix = PrefixCache(self.cache, int(prefix_cache_gb * 2 ** 30), layers, speculative)
        self._untrimmed = 0  # prompt tokens prefilled since freed memory was last handed back

    @torch.no_grad()
    def warm_up(self, progress: Callable[[str], None] | None = None) -> "Engine":
        """Compile now what serving would otherwise compile while requests wait: the indexer's long-context scan at
        every block width this context reaches (with compile_scan), and with compile=True every step graph (each
        batch size up to 4, one dynamic batch beyond, compressed-entry lengths made dynamic; verify and draft steps
        when speculating). Runs on zeros and on dummy rows whose writes all go to the spare slot. Returns self."""
        indexer = next((m for m in self.model.modules() if hasattr(m, "scan_widths")), None)
        widths = [] if indexer is None else indexer.scan_widths(self.max_len // indexer.ratio, self.prefill_chunk)
        if widths:
            if progress is not None:
                progress("compiling the indexer's long-context scan (the first time; cached on disk)")
            indexer.warm_scan(widths, self.cache.dtype, self.device)
        if self.compile:
            self._dummy_steps(progress)
        return self

    def _dummy_steps(self, progress: Callable[[str], None] | None = None):
        """One uncommitted step (and draft) of every batch size and entry-length bucket warm_up compiles."""
        width = 2 if self.speculative else 1
        sizes = sorted({*range(1, min(4, self.max_batch) + 1)} | ({5, self.max_batch} if self.max_batch > 4 else set()))
        starts = sorted({0, max(min(self.model.STEP_BUCKET, self.max_len - width - 1), 0)})
        for B in sizes:
            for start in starts:
                if progress is not None:
                    progress(f"compiling the decode step for {B} sequence(s) at position {start} (the first time; "
                             "cached on disk)")
                slots = torch.arange(B, device=self.device)
                where = (self.cache, slots, torch.full((B,), start, device=self.device), width,
                         torch.zeros(B, dtype=torch.long, device=self.device))
                ids = torch.zeros(B, width, dtype=torch.long, device=self.device)
                # a fresh Step per call, as serving makes them (a Step keeps its rope tables once used: another guard)
                h, _ = self._compiled(self._decode_step, ids, self.cache, self.model.make_step(*where))
                if self.speculative:
                    self._compiled(self._draft_step, h, ids, self.cache, self.model.make_step(*where),
                                   torch.zeros_like(slots))

    # --- requests ---
    def submit(self, prompt: str | Sequence[int], params: SamplingParams | None = None, max_new_tokens: int = 256,
               stop: Iterable[str] = (), stop_token_ids: Iterable[int] = (), logprobs: int | None = None,
               ignore_eos: bool = False, callback: Callable[[Delta], None] | None = None,
               processor: LogitsProcessor | None = None,
               guidance: tuple[Sequence[int], float] | None = None) -> Request:
        """Queue a request. A str prompt is encoded as plain text; token ids (e.g. an encoded chat) go in as they are.
        logprobs: None = off, n >= 0 = the chosen token's log-probability plus the n most likely alternatives (of
        the model's distribution, before any processor). processor: constrained decoding (`LogitsProcessor`, e.g.
        a visual span's grammar, JSON mode); with speculation its row keeps no drafts. guidance: (unconditional
        prompt ids, scale) for classifier-free guidance (dsv4.engine.guidance: a hidden second row; needs
        max_batch >= 2)."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= self.max_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; the context holds {self.max_len} "
                             f"(prompt + generated tokens), so at most {self.max_len - 1} prompt tokens")
        V = self.args.vocab_size
        if min(ids) < 0 or max(ids) >= V:
            raise ValueError(f"prompt token ids must be in [0, {V})")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if logprobs is not None and not 0 <= logprobs <= 20:
            raise ValueError(f"logprobs must be in [0, 20], got {logprobs}")
        if guidance is not None and self.speculative:
            raise ValueError("guidance runs on an engine without speculation")
        if guidance is not None and (self.max_batch < 2 or not guidance[0]):
            raise ValueError("guidance needs an unconditional prompt and an engine with max_batch >= 2")
        params = params or SamplingParams()
        stops = frozenset(int(t) for t in stop_token_ids) | (
            frozenset() if ignore_eos or self.tokenizer.eos_id is None else {self.tokenizer.eos_id})
        req = Request(next(self._ids), ids, params, max_new_tokens, stops, logprobs, callback,
                      StopMatcher(tuple(stop)), self.tokenizer.stream(errors="replace"),
                      params.generator(self.device), processor=processor)
        if guidance is not None:
            uncond, req.guide_scale = [int(i) for i in guidance[0]], float(guidance[1])
            req.twin = Request(next(self._ids), uncond, params, max_new_tokens, frozenset(), None, None,
                               StopMatcher(()), self.tokenizer.stream(errors="replace"), None, guides=req)
        with self._lock:
            self.waiting.append(req)
        return req

    def cancel(self, request_id: int):
        """Stop a request (waiting or running); its slot frees at the next step, which reports it as cancelled."""
        with self._lock:
            self._cancelled.add(request_id)

    def abort_all(self) -> list[Request]:
        """Drop every waiting and running request without a final delta (after a failed step, whose state is
        unknown), freeing their slots. -> the dropped requests."""
        with self._lock:
            dropped = list(self.running) + list(self.waiting)
            self.waiting.clear()
        for r in dropped:
            self._release(r, "error")
        return dropped

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # --- scheduling ---
    @torch.no_grad()
    def step(self) -> list[Delta]:
        deltas: list[Delta] = []
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            for req in [r for r in self.waiting if r.id in cancelled]:
                self.waiting.remove(req)
                deltas.append(self._finish(req, "cancelled"))
        for req in [r for r in self.running if r.id in cancelled]:
            deltas.append(self._finish(req, "cancelled"))
        with self._lock:
            while self.waiting and len(self.free) >= 1 + (self.waiting[0].twin is not None):
                req = self.waiting.popleft()
                for r in (req, req.twin) if req.twin is not None else (req,):
                    r.slot = self.free.pop()
                    self.running.append(r)
        prefill = [r for r in self.running if r.prefilling]
        for r in prefill:  # before its first slice: from the prefix cache (again if snapshots were saved since)
            self._seed(r)
        # decode: the rows that had a token to run before this step (one that finishes its prompt now samples its first
        # token and runs it at the next step; so does a guided row whose partner finishes now)
        decode = [r for r in self.running if not r.prefilling and r.pending is not None]
        if prefill:  # slices that fit the step's budget beside the decode tokens (dsv4.engine.budget)
            sizes = self.budget.plan([r.pos for r in decode], [(r.pos, len(r.prompt) - r.pos) for r in prefill],
                                     2 if self.speculative else 1)
            deltas += self._prefill([r for r, n in zip(prefill, sizes) if n], [n for n in sizes if n])
        decode = [r for r in decode if r.slot is not None]  # (not ended by a partner's first token)
        if decode:
            deltas += self._speculate(decode) if self.speculative else self._decode(decode)
        self.stats["steps"] += 1
        return deltas

    def _seed(self, r: Request):
        if self.prefix is not None:
            self.stats["cached_tokens"] += self.prefix.seed(r)

    def _rows(self, reqs: list[Request], columns: list[list[int]], commit: list[int], width: int | None = None,
              start: list[int] | None = None):
        """One step's input: row i = request i's `columns` (right-padded to `width`) at positions from `start`
        (default: each request's next position), of which the first commit[i] are committed."""
        width = width or max(len(c) for c in columns)
        ids = torch.tensor([c + [0] * (width - len(c)) for c in columns], dtype=torch.long, device=self.device)
        start = [r.pos for r in reqs] if start is None else start
        step = self.model.make_step(self.cache, torch.tensor([r.slot for r in reqs], device=self.device),
                                    torch.tensor(start, device=self.device), width,
                                    torch.tensor(commit, device=self.device))
        return ids, step

    def _prefill(self, reqs: list[Request], sizes: list[int]) -> list[Delta]:
        # slices never cross a multiple of prefill_chunk (where snapshots are kept, and a request restored from the
        # prefix cache lines up with one prefilled from scratch)
        chunks = [r.prompt[r.pos: min(r.pos + n, (r.pos // self.prefill_chunk + 1) * self.prefill_chunk)]
                  for r, n in zip(reqs, sizes)]
        if len(reqs) > 1 and max(r.pos for r in reqs) + max(map(len, chunks)) > self.cache.max_len:
            # a row near the end of the cache, right-padded to a wider row's slice, would run past it: one at a time
            return [d for r, n in zip(reqs, sizes) for d in self._prefill([r], [n])]
        ids, step = self._rows(reqs, chunks, [len(c) for c in chunks])
        h = self.model.step(ids, self.cache, step)
        last = torch.tensor([len(c) - 1 for c in chunks], device=self.device)
        rows = torch.arange(len(reqs), device=self.device)
        streams = self._prefill_mtp(reqs, chunks, h) if self.speculative else [{}] * len(reqs)
        done = []
        self._untrimmed += sum(len(c) for c in chunks)
        if self._untrimmed >= self.TRIM_EVERY:  # long prefills: keep the resident size flat (see release_free_memory)
            self._untrimmed = 0
            release_free_memory()
        for i, (r, c) in enumerate(zip(reqs, chunks)):
            r.pos += len(c)
            r.written = r.pos
            self.stats["prefill_tokens"] += len(c)
            if not r.prefilling:
                done.append(i)
            if self.prefix is not None and (not r.prefilling or r.pos % self.prefill_chunk == 0):
                self.prefix.keep(r, r.prompt, streams[i])
        if not done:
            return []
        sel = torch.tensor(done, device=self.device)
        return self._sample_emit([reqs[i] for i in done], self.model.logits(h[rows[sel], last[sel]][:, None])[:, 0])

    def _compiled(self, fn, *args):
        """Call a (compiled) step. Up to 4 rows the compiled products work row by row (dsv4.kernels.fused), so there the
        batch size stays static: each gets its own graph instead of sharing a dynamic one."""
        if self.compile and args[0].shape[0] <= 4:
            step = next(a for a in args if isinstance(a, Step))
            for t in (*[a for a in args if isinstance(a, torch.Tensor)], step.slots, step.start, step.length,
                      step.positions, step.valid):
                torch._dynamo.mark_static(t, 0)
        return fn(*args)

    # the decode step, head included (what compile=True compiles; the draft step: dsv4.engine.speculation)
    def _decode_logits(self, ids: torch.Tensor, cache: KVCache, step: Step) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.model.step_unchecked(ids, cache, step)
        return h, self.model.logits(h)

    def _decode(self, reqs: list[Request]) -> list[Delta]:
        ids, step = self._rows(reqs, [[r.pending] for r in reqs], [1] * len(reqs))
        logits = self._compiled(self._decode_step, ids, self.cache, step)[1][:, 0]
        for r in reqs:
            r.pos += 1
            r.written = r.pos
        self.stats["decode_tokens"] += len(reqs)
        return self._sample_emit(reqs, logits)

    def _sample_emit(self, reqs: list[Request], logits: torch.Tensor) -> list[Delta]:
        """One token for each row that samples (guided pairs once: dsv4.engine.guidance) from logits [B, V]."""
        reqs, logits = guided_rows(reqs, logits)
        if not reqs:
            return []
        tokens = self._sample(reqs, logits)
        follow(reqs, tokens)
        return self._emit(reqs, [[t] for t in tokens], logits[:, None])

    def _penalised(self, reqs: list[Request], logits: torch.Tensor) -> torch.Tensor:
        counts = self._counts(reqs)
        return logits if counts is None else apply_penalties(logits, counts, [r.params for r in reqs])

    def _counts(self, reqs: list[Request], extra: list[int] | None = None) -> torch.Tensor | None:
        if not any(r.uses_penalties() for r in reqs):
            return None
        V = self.args.vocab_size
        counts = torch.stack([r.counts if r.counts is not None else torch.zeros(V, device=self.device)
                              for r in reqs])
        if extra is not None:  # tokens about to be appended (an accepted draft)
            counts = counts.clone()
            counts[torch.arange(len(reqs)), torch.tensor(extra)] += 1
        return counts

    def _sample(self, reqs: list[Request], logits: torch.Tensor, extra: list[int] | None = None) -> list[int]:
        logits = logits.float()
        constrained = [i for i, r in enumerate(reqs) if r.processor is not None and not r.processor.done]
        if constrained:
            logits = logits.clone()
            for i in constrained:
                logits[i] = reqs[i].processor.mask(logits[i])
        tokens = sample(logits, [r.params for r in reqs], [r.generator for r in reqs],
                        self._counts(reqs, extra)).tolist()
        for i in constrained:
            reqs[i].processor.advance(tokens[i])
        return tokens

    # --- output ---
    def _emit(self, reqs: list[Request], tokens: list[list[int]], logits: torch.Tensor) -> list[Delta]:
        """Hand each row its new tokens (logits [B, k, V] produced them) -> one delta per row."""
        logp = torch.log_softmax(logits.float(), dim=-1) if any(r.logprobs is not None for r in reqs) else None
        return [self._advance(r, toks, None if logp is None else logp[i])
                for i, (r, toks) in enumerate(zip(reqs, tokens))]

    def _advance(self, r: Request, tokens: list[int], logp: torch.Tensor | None) -> Delta:
        """Append a request's new tokens (logp [k, V]: their log-probabilities) up to where it ends (a stop token, a
        stop string, its length); stream their text; at the end, release its slot."""
        text, emitted, lps, reason = [], [], [], None
        for j, t in enumerate(tokens):
            if t in r.stop_token_ids:
                reason = "stop"
                break
            emitted.append(t)
            if r.logprobs is not None:
                lps.append(token_logprobs(logp[j], t, r.logprobs))
            text.append(r.append(t, self.args.vocab_size, self.device))
            if (reason := r.ended(self.max_len)) is not None:
                break
        if emitted and reason is None:
            r.pending = emitted[-1]
        delta = Delta(r.id, "".join(text), emitted, lps if r.logprobs is not None else None)
        if reason is not None:
            delta.text += r.final_text()
            self._release(r, reason)
            delta.finish_reason = reason
        self._deliver(r, delta)
        return delta

    def _finish(self, r: Request, reason: str) -> Delta:
        delta = Delta(r.id, "", [], [] if r.logprobs is not None else None, reason)
        self._release(r, reason)
        self._deliver(r, delta)
        return delta

    def _release(self, r: Request, reason: str):
        if r.twin is not None and r.twin.finish_reason is None:
            self._release(r.twin, reason)
        if self.prefix is not None:  # its prompt and output: the next chat turn's prefix
            if reason != "error":
                self.prefix.keep(r, r.prompt + r.output, dict(enumerate(r.mtp_rows, r.pos - len(r.mtp_rows))))
            self.prefix.release(r.snapshot)
            r.snapshot = None
        r.finish_reason = reason
        if r in self.running:
            self.running.remove(r)
        if r.slot is not None:
            self.free.append(r.slot)
            r.slot = None
        r.mtp_rows = []

    def _deliver(self, r: Request, delta: Delta):
        if r.callback is not None:
            r.callback(delta)

    # --- drivers ---
    def generate(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | Sequence[SamplingParams] | None
                 = None, progress: Callable[[int], None] | None = None, **kwargs) -> list[Completion]:
        """Run every prompt to completion (batched, continuously) -> one Completion per prompt, in order.
        `params` is one SamplingParams for all or one per prompt; other keywords go to `submit`."""
        if params is None or isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        reqs = [self.submit(p, sp, **kwargs) for p, sp in zip(prompts, params)]
        texts: dict[int, list[str]] = {r.id: [] for r in reqs}
        logprobs: dict[int, list] = {r.id: [] for r in reqs}
        left = set(texts)
        while left:
            for d in self.step():
                if d.request_id in texts:
                    texts[d.request_id].append(d.text)
                    logprobs[d.request_id] += d.logprobs or []
                    if d.finish_reason is not None:
                        left.discard(d.request_id)
                        if progress is not None:
                            progress(1)
        return [Completion(r.id, "".join(texts[r.id]), r.output, r.finish_reason, len(r.prompt),
                           logprobs[r.id] if r.logprobs is not None else None) for r in reqs]

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
               progress: Callable[[int, int], None] | None = None, **kwargs) -> Iterator[Delta]:
        """One request's deltas as they come (other queued requests progress too). Closing the iterator early
        (break, KeyboardInterrupt, a dropped client) cancels the request and frees its slot. progress(done, total)
        is called after each step that prefilled some of the prompt (e.g. a progress bar for a long prompt)."""
        req = self.submit(prompt, params, **kwargs)
        try:
            while True:
                before = req.pos
                deltas = self.step()
                if progress is not None and req.pos > before and before < len(req.prompt):
                    progress(min(req.pos, len(req.prompt)), len(req.prompt))
                for d in deltas:
                    if d.request_id == req.id:
                        yield d
                        if d.finish_reason is not None:
                            return
        finally:
            if req.finish_reason is None:
                self.cancel(req.id)
                self.step()
