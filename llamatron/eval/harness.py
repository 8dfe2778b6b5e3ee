"""lm-evaluation-harness adapter: `LlamatronLM`, an lm-eval `LM` over a llamatron model, so that any
harness task runs on any llamatron checkpoint (install `llamatron[eval]`).

    import lm_eval
    from llamatron.eval.harness import LlamatronLM
    lm = LlamatronLM(checkpoint="runs/mine", tokenizer="llama3")
    lm_eval.simple_evaluate(model=lm, tasks=["hellaswag"], task_manager=lm_eval.tasks.TaskManager())

It is registered as lm-eval model "llamatron" (`model_args="checkpoint=DIR,tokenizer=T"`) once this
module is imported. Scoring is `eval/loglikelihood.py`, the built-in tasks' path, so both give the
same numbers; strings become tokens as lm-eval's `TemplateLM` makes them. `generate_until` is greedy
(sampling is refused) with the harness's stop-string handling, decoding through the family's KV cache
(`kv_cache=false`: recomputing the sequence each token). `compile` (true, false or auto: on CUDA)
compiles the model's blocks for scoring, as `llamatron evaluate --compile` does.
"""

from __future__ import annotations

from llamatron.errors import LlamatronError
from llamatron.eval.loglikelihood import greedy_generate, loglikelihoods

try:
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
except ImportError as e:  # pragma: no cover - the extra is installed in CI
    raise LlamatronError(f"lm-evaluation-harness tasks need the lm-eval package ({e}); "
                         "pip install 'llamatron[eval]'") from None


@register_model("llamatron")
class LlamatronLM(TemplateLM):
    """`model`: a module or `Layout` (or `checkpoint`: a checkpoint or run directory to load);
    `tokenizer`: a llamatron tokenizer or its name/path. `add_bos` prepends BOS to every context;
    `kv_cache` false makes generation recompute the sequence for each token; `compile` (None: on
    CUDA) compiles the model's blocks in place for log-likelihoods (`loglikelihoods`)."""

    def __init__(self, model=None, tokenizer="llama3", checkpoint=None, batch_size=8, device="auto",
                 precision=None, max_length=None, add_bos=False, max_gen_toks=256, kv_cache=True, compile=None):
        super().__init__()
        import torch

        from llamatron.runtime import select_device
        from llamatron.tokenizer import load_tokenizer

        self._device = device if isinstance(device, torch.device) else select_device(str(device))
        if model is None:
            if checkpoint is None:
                raise LlamatronError("LlamatronLM needs a model or a checkpoint")
            from llamatron.evaluate import load_model

            model, precision = load_model(checkpoint, self._device, precision)
        self.model = model
        self.llamatron_tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        self.batch_size = int(batch_size)
        self.precision = precision
        self.add_bos = str(add_bos).lower() in ("true", "1")
        self._max_length = int(max_length) if max_length else None
        self.max_gen_toks = int(max_gen_toks)
        self.kv_cache = str(kv_cache).lower() in ("true", "1")
        self.compile = None if compile in (None, "auto") else str(compile).lower() in ("true", "1")

    # -- what TemplateLM asks --------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        tok = self.llamatron_tokenizer
        if tok.eos_id is None:
            raise LlamatronError(f"tokenizer {tok.name}: no end-of-text token, which the harness needs")
        return tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.llamatron_tokenizer.bos_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        from llamatron.parallel.layout import Layout

        module = self.model.model if isinstance(self.model, Layout) else self.model
        return self._max_length or module.args.max_seq_len

    @property
    def tokenizer_name(self) -> str:
        return self.llamatron_tokenizer.name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        ids = self.llamatron_tokenizer.encode(string)
        if self.add_bos and add_special_tokens is not False and self.llamatron_tokenizer.bos_id is not None:
            ids = [self.llamatron_tokenizer.bos_id] + ids
        return ids

    def _scores(self, pairs) -> list[tuple[float, bool]]:
        return loglikelihoods(self.model, pairs, self.batch_size, self._device, self.precision, self.max_length,
                              self.compile)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results = self._scores([(ctx, cont) for _, ctx, cont in requests])
        for (key, _, _), res in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's whole log-likelihood, in windows of the model's context (the harness's
        `get_rolling_token_windows`, every token predicted once, the first from the prefix token)."""
        windows, owner = [], []
        for i, (text,) in enumerate(r.args for r in requests):
            for w in lm_utils.get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id,
                                                        self.max_length, context_len=1):
                windows.append(lm_utils.make_disjoint_window(w))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, self._scores(windows)):
            totals[i] += ll
        for r, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy generation to the first stop string (the request's `until` plus the EOS text) or
        `max_gen_toks`, contexts left-truncated to leave room for them, as the HF backend does."""
        tok = self.llamatron_tokenizer
        eos_text = tok.decode([self.eot_token_id])
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(repr(sorted(r.args[1].items())), []).append(i)
        out = [""] * len(requests)
        for idx in groups.values():
            kwargs = normalize_gen_kwargs(requests[idx[0]].args[1], self.max_gen_toks)
            if kwargs.get("do_sample"):
                raise LlamatronError("generate_until: only greedy decoding (do_sample false, temperature 0)")
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_new = kwargs["max_gen_toks"]
            keep = self.max_length - max_new
            if keep <= 0:
                raise LlamatronError(f"generate_until: max_gen_toks {max_new} leaves no context of {self.max_length}")
            prompts = [self.tok_encode(requests[i].args[0])[-keep:] for i in idx]
            stop = lambda toks: any(s and s in tok.decode(toks) for s in until)  # noqa: E731
            for j in range(0, len(idx), self.batch_size):
                batch = idx[j : j + self.batch_size]
                gen = greedy_generate(self.model, prompts[j : j + self.batch_size], max_new, self._device,
                                      self.precision, stop, self.eot_token_id, self.max_length, self.kv_cache)
                for i, toks in zip(batch, gen):
                    out[i] = postprocess_generated_text(tok.decode(toks), until, None)
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out
