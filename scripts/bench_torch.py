#!/usr/bin/env python3
"""PyTorch on the reference workloads (CPU), measured as the crate's `bench` example measures
the crate, so that the two can be set side by side (`scripts/compare.py` runs both).

The model: nn.Transformer (post-LN, ReLU, dropout 0.1, batch_first) with one nn.Embedding
shared by source and target and tied to the output projection (the "generator", no bias),
sinusoidal positions added after scaling the embeddings by sqrt(d_model). Weights are
PyTorch's own init (the embedding N(0, 1/d_model)); source and target ids are uniform in
[2, vocab); the decoder input is `tgt_len` tokens and the loss covers all of them.
Token 1 starts every decode. See scripts/README.md for the workloads and the FLOP model.

Measurements (`--what`), each timed as the whole call, median over `--steps` calls after
`--warmup` unmeasured calls:

  train_step     model.train(); zero the gradients; teacher-forced forward with a causal
                 target mask and no padding; label-smoothed (0.1) cross-entropy over all
                 batch * tgt_len target positions; backward; one torch.optim.Adam step
                 (lr 1e-4, betas 0.9/0.98, eps 1e-9).
  eval_forward   the same forward (to the logits) under torch.inference_mode(),
                 model.eval() (dropout off, PyTorch's encoder fast path allowed).
  greedy_decode  nn.Transformer as it is, under torch.inference_mode(), model.eval():
                 encode the source once, then for tgt_len steps re-run the whole decoder on
                 the growing prefix (nn.Transformer has no key/value cache), project the
                 last position, take the argmax, append it.
  cached_decode  greedy decoding with a key/value cache written by hand over the SAME
                 nn.Transformer weights, under torch.inference_mode(), model.eval().
                 Timed per call: encode the source once (model.encode, as greedy_decode);
                 for every decoder layer project the memory to cross-attention keys and
                 values once (rows d:2d and 2d:3d of multihead_attn.in_proj_weight/bias);
                 allocate per-layer self-attention caches [B, H, tgt_len, d_k] for keys and
                 values (allocated once per call, filled one position per step, never
                 re-allocated or concatenated). Each step embeds only the newest token
                 (times sqrt(d_model), plus its positional row) and runs every decoder
                 layer on that one position: q, k, v from self_attn's in_proj; k, v written
                 into the caches at this position; F.scaled_dot_product_attention of q over
                 the cached positions 0..i; out_proj; residual + norm1; cross-attention (q
                 from rows 0:d of multihead_attn's in_proj) over the cached memory keys and
                 values; out_proj; residual + norm2; linear1, ReLU, linear2; residual +
                 norm3 (post-LN, as nn.TransformerDecoderLayer with norm_first=False); then
                 the decoder's final LayerNorm (nn.Transformer always has one), the tied
                 generator on that position and the argmax. What is cached across calls:
                 nothing but the model (weight slices are views taken once, before timing).
                 `--check` verifies that it yields the same tokens as greedy_decode.

`--precision bf16` runs every measurement under torch.autocast("cpu", dtype=torch.bfloat16)
(the forward and the loss inside autocast, backward and Adam outside it, as PyTorch
recommends; weights and Adam state stay fp32). The figures of interest are train_step and
eval_forward; the decodes run under autocast too if asked for (the caches then hold what
autocast's linear layers return, bf16).

Output: one line per measurement (one JSON object per line with --json) with the fields
  workload, threads, what, median_ms, min_ms, max_ms, tokens_per_s, gflops, steps, impl,
  precision
as the crate's `bench` example prints them. tokens_per_s counts target tokens
(batch * tgt_len) per call. gflops divides the FLOP model's count (`model_flops`) by the
median. Both decodes are credited with the work of a key/value-cached decode, so
greedy_decode, which recomputes the prefix, does more arithmetic than it is credited for.

Examples:
    .venv-torch/bin/python scripts/bench_torch.py --workload tiny --threads 1
    .venv-torch/bin/python scripts/bench_torch.py --workload small --threads 2 --json
    .venv-torch/bin/python scripts/bench_torch.py --workload tiny --what train_step --precision bf16
    .venv-torch/bin/python scripts/bench_torch.py --workload tiny --check
"""
import argparse
import contextlib
import json
import math
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

WORKLOADS = {
    "tiny": dict(d_model=64, heads=4, d_ff=256, enc_layers=2, dec_layers=2, vocab=100, batch=16, src_len=16, tgt_len=16),
    "small": dict(d_model=256, heads=8, d_ff=1024, enc_layers=2, dec_layers=2, vocab=1000, batch=32, src_len=32, tgt_len=32),
    "base": dict(d_model=512, heads=8, d_ff=2048, enc_layers=6, dec_layers=6, vocab=8000, batch=8, src_len=64, tgt_len=64),
}
WHATS = ("train_step", "eval_forward", "greedy_decode", "cached_decode")
BOS = 1


def model_flops(w, what):
    """FLOP of one measurement, per the FLOP model of scripts/README.md.

    Dense layer m -> n: 2*m*n per token. Attention sub-layer: 4 * len_q * len_k * d_model
    per sequence (QK^T and AV). Output projection: dense d_model -> vocab. A training step
    is 3x the forward. Embeddings, LayerNorm, softmax, biases and the loss are not counted.
    greedy_decode and cached_decode: the encoder over the source once, then tgt_len decoder
    steps of one token, step i attending to i cached positions (self) and src_len positions
    (cross), whatever the implementation really computes.
    """
    d, f, v = w["d_model"], w["d_ff"], w["vocab"]
    s, t, b = w["src_len"], w["tgt_len"], w["batch"]

    def dense(m, n, tokens):
        return 2 * m * n * tokens

    def attn(lq, lk):
        return 4 * lq * lk * d

    enc_layer = dense(d, 3 * d, s) + attn(s, s) + dense(d, d, s) + dense(d, f, s) + dense(f, d, s)
    encoder = w["enc_layers"] * enc_layer

    def decoder(self_attn, cross_attn):
        per_layer = (dense(d, 3 * d, t) + self_attn + dense(d, d, t)  # masked self-attention
                     + dense(d, d, t) + dense(d, 2 * d, s) + cross_attn + dense(d, d, t)  # cross-attention
                     + dense(d, f, t) + dense(f, d, t))  # feed-forward
        return w["dec_layers"] * per_layer

    out_proj = dense(d, v, t)
    if what in ("train_step", "eval_forward"):
        fwd = encoder + decoder(attn(t, t), attn(t, s)) + out_proj
        return b * fwd * (3 if what == "train_step" else 1)
    if what in ("greedy_decode", "cached_decode"):
        self_cached = sum(attn(1, i) for i in range(1, t + 1))
        cross = sum(attn(1, s) for _ in range(t))
        return b * (encoder + decoder(self_cached, cross) + out_proj)
    raise ValueError(what)


def sinusoidal_positions(max_len, d_model):
    """The paper's table: row p is sin/cos of p / 10000^(2i/d_model), interleaved."""
    pos = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)
    div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    pe = torch.zeros(max_len, d_model)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)
    return pe


class Seq2Seq(nn.Module):
    """nn.Transformer with a shared, tied embedding and sinusoidal positions."""

    def __init__(self, w, dropout=0.1, max_len=512):
        super().__init__()
        d = w["d_model"]
        self.d_model = d
        self.embed = nn.Embedding(w["vocab"], d)
        nn.init.normal_(self.embed.weight, std=d ** -0.5)
        self.register_buffer("pe", sinusoidal_positions(max_len, d), persistent=False)
        self.drop = nn.Dropout(dropout)
        self.transformer = nn.Transformer(
            d_model=d, nhead=w["heads"], num_encoder_layers=w["enc_layers"],
            num_decoder_layers=w["dec_layers"], dim_feedforward=w["d_ff"], dropout=dropout,
            activation="relu", batch_first=True, norm_first=False)
        self.generator = nn.Linear(d, w["vocab"], bias=False)
        self.generator.weight = self.embed.weight  # tied output projection

    def embed_tokens(self, tokens):
        x = self.embed(tokens) * math.sqrt(self.d_model) + self.pe[: tokens.shape[1]]
        return self.drop(x)

    def encode(self, src):
        return self.transformer.encoder(self.embed_tokens(src))

    def decode(self, tgt_in, memory):
        t = tgt_in.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t)
        return self.transformer.decoder(self.embed_tokens(tgt_in), memory, tgt_mask=mask, tgt_is_causal=True)

    def forward(self, src, tgt_in):
        return self.generator(self.decode(tgt_in, self.encode(src)))


@torch.inference_mode()
def greedy_decode(model, src, steps, bos=BOS, keep_logits=False):
    """nn.Transformer's own greedy decode: the whole prefix through the decoder at every step.

    Returns the generated tokens [B, steps] and, with keep_logits, the logits of every
    step [B, steps, vocab].
    """
    memory = model.encode(src)
    ys = torch.full((src.shape[0], 1), bos, dtype=torch.long)
    logits = []
    for _ in range(steps):
        h = model.decode(ys, memory)  # the whole prefix again: no key/value cache
        step_logits = model.generator(h[:, -1])
        if keep_logits:
            logits.append(step_logits.float())
        ys = torch.cat([ys, step_logits.argmax(-1, keepdim=True)], dim=1)
    return ys[:, 1:], (torch.stack(logits, 1) if keep_logits else None)


class CachedDecoder:
    """Greedy decoding with a hand-written key/value cache over a Seq2Seq's own weights.

    Built once per model: it only takes views of the weights (slices of the in_proj
    matrices), so it follows the model's parameters. Each call encodes the source, projects
    the memory to per-layer cross-attention keys/values once, and decodes one position per
    step, computing exactly what nn.TransformerDecoderLayer (post-LN, ReLU) computes for the
    newest position. Dropout is not applied: call it with the model in eval mode.
    """

    def __init__(self, model):
        tr = model.transformer
        self.model = model
        self.d = model.d_model
        self.heads = tr.decoder.layers[0].self_attn.num_heads
        self.d_k = self.d // self.heads
        self.scale_embed = math.sqrt(self.d)
        self.final_norm = tr.decoder.norm  # nn.Transformer's decoder ends with a LayerNorm
        d = self.d
        self.layers = []
        for layer in tr.decoder.layers:
            assert not layer.norm_first and layer.activation is F.relu, "post-LN ReLU layers only"
            sa, ca = layer.self_attn, layer.multihead_attn
            ca_w, ca_b = ca.in_proj_weight.detach(), ca.in_proj_bias.detach()  # sliced below: no autograd views
            self.layers.append(dict(
                sa_w=sa.in_proj_weight, sa_b=sa.in_proj_bias,
                sa_out_w=sa.out_proj.weight, sa_out_b=sa.out_proj.bias,
                ca_q_w=ca_w[:d], ca_q_b=ca_b[:d],
                ca_k_w=ca_w[d:2 * d], ca_k_b=ca_b[d:2 * d],
                ca_v_w=ca_w[2 * d:], ca_v_b=ca_b[2 * d:],
                ca_out_w=ca.out_proj.weight, ca_out_b=ca.out_proj.bias,
                ff1_w=layer.linear1.weight, ff1_b=layer.linear1.bias,
                ff2_w=layer.linear2.weight, ff2_b=layer.linear2.bias,
                norm1=layer.norm1, norm2=layer.norm2, norm3=layer.norm3,
            ))

    def _heads(self, x):
        """[B, L, d] -> [B, H, L, d_k]"""
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.d_k).transpose(1, 2)

    def _merge(self, x):
        """[B, H, 1, d_k] -> [B, 1, d]"""
        return x.transpose(1, 2).reshape(x.shape[0], 1, self.d)

    @staticmethod
    def _norm(norm, x):
        return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)

    @torch.inference_mode()
    def __call__(self, src, steps, bos=BOS, keep_logits=False):
        """Generated tokens [B, steps] and, with keep_logits, the logits [B, steps, vocab]."""
        model = self.model
        b = src.shape[0]
        memory = model.encode(src)
        # Cross-attention keys and values: once per decode, [B, H, S, d_k] per layer.
        mem_kv = [(self._heads(F.linear(memory, p["ca_k_w"], p["ca_k_b"])),
                   self._heads(F.linear(memory, p["ca_v_w"], p["ca_v_b"])))
                  for p in self.layers]
        # Self-attention caches, filled one position per step. Their dtype is what the
        # projections return (fp32, or bf16 under autocast).
        dtype = mem_kv[0][0].dtype
        caches = [(torch.empty(b, self.heads, steps, self.d_k, dtype=dtype),
                   torch.empty(b, self.heads, steps, self.d_k, dtype=dtype))
                  for _ in self.layers]
        tok = torch.full((b, 1), bos, dtype=torch.long)
        out = torch.empty(b, steps, dtype=torch.long)
        logits = []
        for i in range(steps):
            x = model.embed(tok) * self.scale_embed + model.pe[i]  # [B, 1, d]
            for p, (mem_k, mem_v), (k_cache, v_cache) in zip(self.layers, mem_kv, caches):
                # masked self-attention: the newest position over positions 0..i
                q, k, v = F.linear(x, p["sa_w"], p["sa_b"]).chunk(3, dim=-1)
                k_cache[:, :, i:i + 1] = self._heads(k)
                v_cache[:, :, i:i + 1] = self._heads(v)
                a = F.scaled_dot_product_attention(self._heads(q), k_cache[:, :, :i + 1], v_cache[:, :, :i + 1])
                x = self._norm(p["norm1"], x + F.linear(self._merge(a), p["sa_out_w"], p["sa_out_b"]))
                # cross-attention over the memory's cached keys and values
                q = self._heads(F.linear(x, p["ca_q_w"], p["ca_q_b"]))
                a = F.scaled_dot_product_attention(q, mem_k, mem_v)
                x = self._norm(p["norm2"], x + F.linear(self._merge(a), p["ca_out_w"], p["ca_out_b"]))
                # feed-forward
                h = F.linear(F.relu(F.linear(x, p["ff1_w"], p["ff1_b"])), p["ff2_w"], p["ff2_b"])
                x = self._norm(p["norm3"], x + h)
            step_logits = model.generator(self._norm(self.final_norm, x[:, 0]))  # [B, vocab]
            if keep_logits:
                logits.append(step_logits.float())
            tok = step_logits.argmax(-1, keepdim=True)
            out[:, i:i + 1] = tok
        return out, (torch.stack(logits, 1) if keep_logits else None)


def precision_context(precision):
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def check_cached_decode(model, src, steps, precision, atol):
    """Compare cached_decode with greedy_decode on the same model and source.

    Tokens alone are a weak test: a randomly initialised model tends to repeat one token. So
    the logits of every step are compared too. Passes when the tokens are identical and all
    logits agree within atol. If tokens differ (float differences can flip a near tie), it
    passes only when, for each sequence, the logits agree within atol up to and including
    its first disagreement and, there, greedy_decode's top two logits are within 2 * atol
    of each other (a tie). Returns True when the check passes.
    """
    model.eval()
    cached = CachedDecoder(model)
    with precision_context(precision):
        ref_tok, ref_logits = greedy_decode(model, src, steps, keep_logits=True)
        got_tok, got_logits = cached(src, steps, keep_logits=True)
    b = src.shape[0]
    same = torch.equal(ref_tok, got_tok)
    if same:
        diff = (ref_logits - got_logits).abs().max().item()
        ok = diff <= atol
        print(f"check: {b} x {steps} tokens identical ({ref_tok.unique().numel()} distinct); "
              f"max |logit difference| over all steps {diff:.3g} (atol {atol}, logits up to "
              f"{ref_logits.abs().max().item():.3g}): {'OK' if ok else 'FAILED'}")
        return ok
    ok = True
    for row in range(b):
        mismatch = (ref_tok[row] != got_tok[row]).nonzero()
        if len(mismatch) == 0:
            continue
        j = mismatch[0].item()
        diff = (ref_logits[row, :j + 1] - got_logits[row, :j + 1]).abs().max().item()
        top2 = ref_logits[row, j].topk(2).values
        gap = (top2[0] - top2[1]).item()
        tie = diff <= atol and gap <= 2 * atol
        ok &= tie
        print(f"check: sequence {row} first differs at step {j}: max |logit difference| up to it {diff:.3g}, "
              f"top-2 gap there {gap:.3g} -> {'a tie flip within tolerance' if tie else 'MISMATCH'}")
    print(f"check: tokens differ; {'accepted as tie flips' if ok else 'FAILED'} (atol {atol})")
    return ok


def time_it(fn, steps, warmup):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=sorted(WORKLOADS), required=True)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    ap.add_argument("--steps", type=int, default=10, help="measured repetitions (default 10)")
    ap.add_argument("--warmup", type=int, default=3, help="unmeasured repetitions first (default 3)")
    ap.add_argument("--what", nargs="+", choices=WHATS, default=list(WHATS))
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                    help="fp32 (default) or bf16: every measurement under torch.autocast('cpu', torch.bfloat16)")
    ap.add_argument("--adam", choices=("default", "foreach", "fused"), default="default",
                    help="torch.optim.Adam implementation (default: torch's choice, the for-loop one on CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=None,
                    help="the batch instead of the workload's (1: one sequence at a time); no longer a reference "
                         "workload, and the JSON lines then carry 'batch'")
    ap.add_argument("--json", action="store_true", help="print JSON lines")
    ap.add_argument("--check", action="store_true",
                    help="measure nothing: check that cached_decode gives greedy_decode's tokens on this "
                         "workload (exit status 1 if not)")
    ap.add_argument("--check-atol", type=float, default=None,
                    help="logit tolerance of --check (default 1e-4 for fp32, 0.1 for bf16)")
    args = ap.parse_args()
    if args.threads < 1 or args.steps < 1 or args.warmup < 0 or (args.batch is not None and args.batch < 1):
        ap.error("--threads, --steps and --batch must be at least 1, --warmup at least 0")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    w = dict(WORKLOADS[args.workload])
    if args.batch is not None:
        w["batch"] = args.batch
    b, s, t, v = w["batch"], w["src_len"], w["tgt_len"], w["vocab"]
    model = Seq2Seq(w)
    src = torch.randint(2, v, (b, s))
    tgt = torch.randint(2, v, (b, t + 1))
    tgt_in, tgt_out = tgt[:, :-1], tgt[:, 1:]  # the decoder sees tgt_len tokens, the loss covers all of them
    n_params = sum(p.numel() for p in model.parameters())
    print(f"# torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, threads={torch.get_num_threads()}, "
          f"precision={args.precision}, workload={args.workload} {w}, parameters={n_params}", file=sys.stderr)

    if args.check:
        atol = args.check_atol if args.check_atol is not None else (1e-4 if args.precision == "fp32" else 0.1)
        sys.exit(0 if check_cached_decode(model, src, t, args.precision, atol) else 1)

    adam_kw = {} if args.adam == "default" else {args.adam: True}
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9, **adam_kw)
    cached = CachedDecoder(model)
    autocast = lambda: precision_context(args.precision)  # noqa: E731

    def train_step():
        model.train()
        opt.zero_grad(set_to_none=True)
        with autocast():
            logits = model(src, tgt_in)
            loss = F.cross_entropy(logits.reshape(-1, v), tgt_out.reshape(-1), label_smoothing=0.1)
        loss.backward()
        opt.step()

    def eval_forward():
        model.eval()
        with torch.inference_mode(), autocast():
            model(src, tgt_in)

    def greedy():
        model.eval()
        with autocast():
            greedy_decode(model, src, t)

    def cached_greedy():
        model.eval()
        with autocast():
            cached(src, t)

    fns = {"train_step": train_step, "eval_forward": eval_forward, "greedy_decode": greedy,
           "cached_decode": cached_greedy}
    for what in args.what:
        times = time_it(fns[what], args.steps, args.warmup)
        med = statistics.median(times)
        rec = {
            "workload": args.workload,
            "threads": args.threads,
            "what": what,
            "median_ms": round(med * 1e3, 3),
            "min_ms": round(min(times) * 1e3, 3),
            "max_ms": round(max(times) * 1e3, 3),
            "tokens_per_s": round(b * t / med, 1),
            "gflops": round(model_flops(w, what) / med / 1e9, 2),
            "steps": args.steps,
            "impl": f"torch {torch.__version__}",
            "precision": args.precision,
        }
        if args.batch is not None:
            rec["batch"] = args.batch
        if args.json:
            print(json.dumps(rec), flush=True)
        else:
            print(f"{rec['workload']:>5} threads={rec['threads']} {args.precision} {what:<13} "
                  f"median {rec['median_ms']:10.3f} ms (min {rec['min_ms']:.3f}, max {rec['max_ms']:.3f})  "
                  f"{rec['tokens_per_s']:10.1f} tok/s {rec['gflops']:8.2f} GFLOP/s", flush=True)


if __name__ == "__main__":
    main()
