#!/usr/bin/env python3
"""PyTorch side of the `nn.Transformer` parity tests: fixtures, round-trip check, comparison.

The Rust example `pytorch_parity` reads an IN file written here, runs the crate's
encoder-decoder on it and writes an OUT file:

    cargo run --release --example pytorch_parity -- IN.safetensors OUT.safetensors

This script writes the IN files and PyTorch's reference results, and checks OUT files
against them. Subcommands:

    .venv-torch/bin/python scripts/pytorch_fixtures.py generate tests/fixtures
    .venv-torch/bin/python scripts/pytorch_fixtures.py compare OUT.safetensors tests/fixtures/NAME.expected.safetensors
    .venv-torch/bin/python scripts/pytorch_fixtures.py check OUT.safetensors tests/fixtures/NAME.safetensors

`generate DIR` writes, for every fixture in FIXTURES below:

* `DIR/<name>.safetensors` (IN): the f32 state_dict of
  `nn.Transformer(d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward,
  dropout=0.0, activation, layer_norm_eps, batch_first=True, norm_first)` under PyTorch's
  own key names; `src` [B, S, d], `tgt` [B, T, d], `grad_output` [B, T, d] (f32, N(0, 1));
  optionally `src_key_padding_mask` [B, S] and `tgt_key_padding_mask` [B, T] (U8, 1 =
  padded; the source mask is also the `memory_key_padding_mask`). Metadata: `config` (JSON:
  d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, activation
  "relu"/"gelu" (exact erf), norm_first, layer_norm_eps, causal), `torch_version`, `seed`,
  `name`.
* `DIR/<name>.expected.safetensors`: `output` [B, T, d] and, for L = sum(output *
  grad_output), `grad.src`, `grad.tgt` and `grad.<name>` for every parameter, all f32.

How the reference is computed: weights are PyTorch's init (xavier_uniform for matrices)
and then every 1-D parameter (all biases, LayerNorm weights and biases) gets N(0, 0.1^2)
added, so that those gradients are tested at a generic point; the weights and inputs are
cast to f32 first, and the reference is the float64 computation on exactly those stored f32
values (`model.double()`), rounded to f32 only when written. The slow path is used: the
model is in `train()` mode with dropout 0.0, grad enabled, and the MHA fast path switched
off (the eval/no-grad fast path zero-fills padded outputs through nested tensors). Masks go
in as bool tensors (True = padded) to `src_key_padding_mask`, `tgt_key_padding_mask` and
`memory_key_padding_mask`; causal fixtures pass `tgt_mask =
nn.Transformer.generate_square_subsequent_mask(T)` and `tgt_is_causal=True`.

Padding masks only keys (as in PyTorch): padded *query* rows of `output` are computed like
any other row and are compared too; `grad_output` is nonzero there. No query row is ever
fully masked (padding is never a whole row, and a causal target is padded only where the
first position stays unpadded).

Sanity checks in `generate`: the written files are reloaded and their keys and shapes
verified, and PyTorch's own f32 computation (same stored values) is compared with the f64
reference; it must stay within the acceptance bounds (forward 2e-5, gradients 2e-4,
relative to max|reference|), which shows those bounds are reachable in f32; and in ReLU
fixtures no ReLU input lies within 1e-5 of the kink (so f32 rounding cannot flip a unit).

`compare OUT EXPECTED` prints max|got - ref| / max|ref| for `output` and every gradient and
exits non-zero if the forward is above 2e-5 or any gradient above 2e-4 (the bound the Rust
test uses) or a key is missing.

`check OUT IN` is the weight round trip: it loads `weights.<name>` from OUT into a fresh
`nn.Transformer` built from IN's config (strict `load_state_dict`), runs it (f64) on IN's
inputs and masks, and compares with OUT's `output` and with the reference
(`<IN stem>.expected.safetensors` beside IN); exits non-zero above 2e-5 relative.

Run with torch 2.15.0+cu132 (CPU), numpy 2.4.6, safetensors 0.8.0; seeds 1000 + fixture
index (recorded as `seed` in every file). The fixture list with configs is in
tests/fixtures/README.md (generated together with the fixtures).
"""
import argparse
import json
import math
import sys
import warnings
from pathlib import Path

import torch
from torch import nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

FORWARD_BOUND = 2e-5
GRAD_BOUND = 2e-4
BASE_SEED = 1000
BIAS_PERTURBATION = 0.1
RELU_MARGIN = 1e-5  # min |ReLU input| allowed, about 100x the f32 rounding of those inputs

CONFIG_KEYS = (
    "d_model",
    "nhead",
    "num_encoder_layers",
    "num_decoder_layers",
    "dim_feedforward",
    "activation",
    "norm_first",
    "layer_norm_eps",
    "causal",
)


def lengths_mask(lengths, n):
    """Right padding: row b keeps its first lengths[b] positions."""
    return [[0 if i < length else 1 for i in range(n)] for length in lengths]


def cfg(d, h, ne, nd, ff, act, pre, eps=1e-5, causal=False):
    return dict(
        d_model=d,
        nhead=h,
        num_encoder_layers=ne,
        num_decoder_layers=nd,
        dim_feedforward=ff,
        activation=act,
        norm_first=pre,
        layer_norm_eps=eps,
        causal=causal,
    )


# name, config, (B, S, T), src padding rows or None, tgt padding rows or None (1 = padded)
FIXTURES = [
    ("post_relu_d8h1_1x1",
     cfg(8, 1, 1, 1, 16, "relu", False), (2, 5, 4), None, None),
    ("pre_relu_d8h2_1x1_causal",
     cfg(8, 2, 1, 1, 12, "relu", True, causal=True), (2, 4, 5), None, None),
    ("post_gelu_d6h3_2x1_srcpad",
     cfg(6, 3, 2, 1, 11, "gelu", False), (3, 6, 4), lengths_mask([6, 4, 2], 6), None),
    ("pre_gelu_d10h5_1x3_tgtpad_causal",
     cfg(10, 5, 1, 3, 7, "gelu", True, causal=True), (3, 5, 6), None, lengths_mask([6, 3, 1], 6)),
    ("post_relu_d16h4_2x2_pad_causal",
     cfg(16, 4, 2, 2, 24, "relu", False, causal=True), (2, 6, 5),
     lengths_mask([3, 6], 6), lengths_mask([5, 2], 5)),
    ("pre_relu_d6h1_2x2_srcpad",
     cfg(6, 1, 2, 2, 9, "relu", True), (2, 5, 3), lengths_mask([5, 2], 5), None),
    ("post_gelu_d10h2_1x3_eps1e-3_tgtpad",
     cfg(10, 2, 1, 3, 13, "gelu", False, eps=1e-3), (2, 4, 6), None, lengths_mask([4, 6], 6)),
    ("pre_gelu_d16h8_2x1_eps5e-2_causal",
     cfg(16, 8, 2, 1, 20, "gelu", True, eps=5e-2, causal=True), (2, 3, 4), None, None),
    ("post_relu_d16h16_1x1_pad_causal",
     cfg(16, 16, 1, 1, 5, "relu", False, causal=True), (3, 4, 5),
     lengths_mask([4, 1, 3], 4), lengths_mask([5, 4, 2], 5)),
    # Padding that is not a suffix: left padding and holes (not causal, so no row is empty).
    ("pre_relu_d8h4_2x2_scattered_pad",
     cfg(8, 4, 2, 2, 15, "relu", True), (3, 6, 5),
     [[1, 1, 0, 0, 0, 0], [0, 1, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0]],
     [[0, 1, 1, 0, 0], [1, 0, 0, 0, 1], [1, 1, 1, 1, 0]]),
    ("post_gelu_d12h2_2x2_pad_causal",
     cfg(12, 2, 2, 2, 17, "gelu", False, causal=True), (3, 5, 6),
     lengths_mask([5, 3, 4], 5), lengths_mask([2, 6, 5], 6)),
    ("pre_gelu_d12h3_2x2_eps2e-2_pad_causal",
     cfg(12, 3, 2, 2, 18, "gelu", True, eps=2e-2, causal=True), (2, 6, 6),
     lengths_mask([2, 6], 6), lengths_mask([6, 3], 6)),
    # Length-1 source, batch of one.
    ("pre_relu_d4h2_1x1_len1_causal",
     cfg(4, 2, 1, 1, 3, "relu", True, causal=True), (1, 1, 3), None, None),
]


def build_model(config):
    with warnings.catch_warnings():
        # "enable_nested_tensor is True, but self.use_nested_tensor is False because ..."
        warnings.simplefilter("ignore", UserWarning)
        return nn.Transformer(
            d_model=config["d_model"],
            nhead=config["nhead"],
            num_encoder_layers=config["num_encoder_layers"],
            num_decoder_layers=config["num_decoder_layers"],
            dim_feedforward=config["dim_feedforward"],
            dropout=0.0,
            activation=config["activation"],
            layer_norm_eps=config["layer_norm_eps"],
            batch_first=True,
            norm_first=config["norm_first"],
        )


def run(model, config, src, tgt, grad_output, src_pad, tgt_pad):
    """Forward and backward on the slow path. Returns {output, grad.src, grad.tgt, grad.*}."""
    dtype = next(model.parameters()).dtype
    model.train()  # dropout is 0.0; train mode keeps the encoder off the nested-tensor path
    model.zero_grad(set_to_none=True)
    src = src.to(dtype).clone().requires_grad_(True)
    tgt = tgt.to(dtype).clone().requires_grad_(True)
    kwargs = {}
    if src_pad is not None:
        kwargs["src_key_padding_mask"] = src_pad.bool()
        kwargs["memory_key_padding_mask"] = src_pad.bool()
    if tgt_pad is not None:
        kwargs["tgt_key_padding_mask"] = tgt_pad.bool()
    if config["causal"]:
        t = tgt.shape[1]
        kwargs["tgt_mask"] = nn.Transformer.generate_square_subsequent_mask(t, dtype=dtype)
        kwargs["tgt_is_causal"] = True
    with torch.enable_grad(), warnings.catch_warnings():
        # "Support for mismatched key_padding_mask and attn_mask is deprecated" (float
        # causal mask with a bool padding mask; both are converted to the same float mask).
        warnings.simplefilter("ignore", UserWarning)
        output = model(src, tgt, **kwargs)
        output.backward(grad_output.to(dtype))
    result = {"output": output.detach(), "grad.src": src.grad, "grad.tgt": tgt.grad}
    for name, p in model.named_parameters():
        result["grad." + name] = p.grad
    return result


def rel_err(got, ref):
    got = got.double()
    ref = ref.double()
    scale = ref.abs().max().item()
    diff = (got - ref).abs().max().item()
    return diff / scale if scale > 0 else diff


def config_from_file(path):
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        sys.exit(f"{path}: no `config` in the safetensors metadata")
    config = json.loads(meta["config"])
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        sys.exit(f"{path}: config lacks {missing}")
    return config, meta


def inputs_from(tensors):
    return (
        tensors["src"],
        tensors["tgt"],
        tensors["grad_output"],
        tensors.get("src_key_padding_mask"),
        tensors.get("tgt_key_padding_mask"),
    )


def make_fixture(index, name, config, dims, src_rows, tgt_rows):
    seed = BASE_SEED + index
    torch.manual_seed(seed)
    b, s, t = dims
    d = config["d_model"]
    model = build_model(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(BIAS_PERTURBATION * torch.randn_like(p))
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    src = torch.randn(b, s, d, dtype=torch.float32)
    tgt = torch.randn(b, t, d, dtype=torch.float32)
    grad_output = torch.randn(b, t, d, dtype=torch.float32)
    src_pad = None if src_rows is None else torch.tensor(src_rows, dtype=torch.uint8)
    tgt_pad = None if tgt_rows is None else torch.tensor(tgt_rows, dtype=torch.uint8)
    for rows, n, what in ((src_pad, s, "src"), (tgt_pad, t, "tgt")):
        if rows is not None:
            assert rows.shape == (b, n), (name, what, rows.shape)
            assert bool((rows == 0).any(dim=1).all()), f"{name}: a {what} row is all padding"
    if config["causal"] and tgt_pad is not None:
        assert bool((tgt_pad[:, 0] == 0).all()), f"{name}: causal target padded at position 0"

    # Reference: f64 on the stored f32 values.
    ref_model = build_model(config).double()
    ref_model.load_state_dict({k: v.double() for k, v in state.items()}, strict=True)
    kink = []  # |linear1 output| of every ReLU unit: far from 0, no f32/f64 sign flip
    if config["activation"] == "relu":
        for mod_name, mod in ref_model.named_modules():
            if mod_name.endswith(".linear1"):
                mod.register_forward_hook(lambda m, i, o: kink.append(o.abs().min().item()))
    ref = run(ref_model, config, src, tgt, grad_output, src_pad, tgt_pad)
    if kink:
        assert min(kink) > RELU_MARGIN, f"{name}: a ReLU input is {min(kink):.1e} from the kink"
    for k, v in ref.items():
        assert v is not None and torch.isfinite(v).all(), (name, k)

    # PyTorch's own f32 computation on the same values, against the f64 reference.
    f32_model = build_model(config)
    f32_model.load_state_dict(state, strict=True)
    f32 = run(f32_model, config, src, tgt, grad_output, src_pad, tgt_pad)
    fwd_err = rel_err(f32["output"], ref["output"])
    grad_errs = {k: rel_err(f32[k], ref[k]) for k in ref if k != "output"}
    worst_grad = max(grad_errs, key=grad_errs.get)

    meta = {
        "config": json.dumps({k: config[k] for k in CONFIG_KEYS}),
        "torch_version": torch.__version__,
        "seed": str(seed),
        "name": name,
    }
    inputs = dict(state)
    inputs["src"] = src.contiguous()
    inputs["tgt"] = tgt.contiguous()
    inputs["grad_output"] = grad_output.contiguous()
    if src_pad is not None:
        inputs["src_key_padding_mask"] = src_pad.contiguous()
    if tgt_pad is not None:
        inputs["tgt_key_padding_mask"] = tgt_pad.contiguous()
    expected = {k: v.detach().to(torch.float32).contiguous() for k, v in ref.items()}
    exp_meta = dict(meta)
    exp_meta["reference_dtype"] = "float64"
    exp_meta["f32_forward_rel_err"] = f"{fwd_err:.3e}"
    exp_meta["f32_max_grad_rel_err"] = f"{grad_errs[worst_grad]:.3e}"
    return inputs, meta, expected, exp_meta, (fwd_err, worst_grad, grad_errs[worst_grad])


def save(tensors, path, metadata):
    """`save_file`, then the `__metadata__` entries put in sorted order in the header.

    safetensors' Rust writer emits the metadata map in HashMap order, which changes from
    run to run; sorting it (same bytes, same length) makes the fixtures byte-reproducible.
    """
    save_file(tensors, str(path), metadata=metadata)
    raw = bytearray(Path(path).read_bytes())
    n = int.from_bytes(raw[:8], "little")
    text = raw[8 : 8 + n].decode("utf-8")
    stripped = text.rstrip(" ")
    header = json.loads(stripped)
    compact = dict(separators=(",", ":"), ensure_ascii=False)
    assert json.dumps(header, **compact) == stripped, "unexpected header formatting"
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    new = json.dumps(header, **compact)
    assert len(new) == len(stripped)
    raw[8 : 8 + n] = (new + text[len(stripped) :]).encode("utf-8")
    Path(path).write_bytes(bytes(raw))


def verify_written(in_path, exp_path, inputs, expected, config, dims, meta):
    b, s, t = dims
    d = config["d_model"]
    got_in = load_file(str(in_path))
    got_exp = load_file(str(exp_path))
    assert set(got_in) == set(inputs), (in_path, set(got_in) ^ set(inputs))
    for k, v in inputs.items():
        assert got_in[k].dtype == v.dtype and torch.equal(got_in[k], v), (in_path, k)
    assert got_in["src"].shape == (b, s, d) and got_in["tgt"].shape == (b, t, d)
    assert got_in["grad_output"].shape == (b, t, d)
    if "src_key_padding_mask" in got_in:
        assert got_in["src_key_padding_mask"].shape == (b, s)
        assert got_in["src_key_padding_mask"].dtype == torch.uint8
    if "tgt_key_padding_mask" in got_in:
        assert got_in["tgt_key_padding_mask"].shape == (b, t)
        assert got_in["tgt_key_padding_mask"].dtype == torch.uint8
    fresh = build_model(config)
    names = [n for n, _ in fresh.named_parameters()]
    assert list(fresh.state_dict().keys()) == names  # no buffers in nn.Transformer
    for n, p in fresh.state_dict().items():
        assert got_in[n].shape == p.shape and got_in[n].dtype == torch.float32, (in_path, n)
    want = {"output", "grad.src", "grad.tgt"} | {"grad." + n for n in names}
    assert set(got_exp) == want, (exp_path, set(got_exp) ^ want)
    assert got_exp["output"].shape == (b, t, d)
    assert got_exp["grad.src"].shape == (b, s, d) and got_exp["grad.tgt"].shape == (b, t, d)
    for n in names:
        assert got_exp["grad." + n].shape == got_in[n].shape, (exp_path, n)
    for k, v in got_exp.items():
        assert v.dtype == torch.float32 and torch.equal(v, expected[k]), (exp_path, k)
    for path in (in_path, exp_path):
        _, m = config_from_file(path)
        assert json.loads(m["config"]) == {k: config[k] for k in CONFIG_KEYS}
        assert m["torch_version"] == meta["torch_version"] and m["seed"] == meta["seed"]


def describe(config, dims, src_rows, tgt_rows):
    b, s, t = dims
    parts = [
        "pre-norm" if config["norm_first"] else "post-norm",
        config["activation"],
        f"d_model {config['d_model']}",
        f"nhead {config['nhead']}",
        f"layers {config['num_encoder_layers']}+{config['num_decoder_layers']}",
        f"ff {config['dim_feedforward']}",
        f"eps {config['layer_norm_eps']:g}",
        "causal" if config["causal"] else "not causal",
        f"B {b} S {s} T {t}",
    ]

    def pad(rows):
        return "/".join("".join(str(x) for x in r) for r in rows)

    parts.append("src pad " + pad(src_rows) if src_rows is not None else "no src pad")
    parts.append("tgt pad " + pad(tgt_rows) if tgt_rows is not None else "no tgt pad")
    return ", ".join(parts)


def generate(out_dir):
    torch.backends.mha.set_fastpath_enabled(False)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    worst_fwd, worst_grad = 0.0, 0.0
    print(f"torch {torch.__version__}; f32 PyTorch vs its f64 reference (max|f32 - f64| / max|f64|):")
    for index, (name, config, dims, src_rows, tgt_rows) in enumerate(FIXTURES):
        inputs, meta, expected, exp_meta, (fwd, gname, gerr) = make_fixture(
            index, name, config, dims, src_rows, tgt_rows
        )
        in_path = out_dir / f"{name}.safetensors"
        exp_path = out_dir / f"{name}.expected.safetensors"
        save(inputs, in_path, meta)
        save(expected, exp_path, exp_meta)
        verify_written(in_path, exp_path, inputs, expected, config, dims, meta)
        print(f"  {name:40s} forward {fwd:.2e}  worst gradient {gerr:.2e} ({gname})")
        if fwd > FORWARD_BOUND or gerr > GRAD_BOUND:
            sys.exit(f"{name}: PyTorch f32 itself is outside the acceptance bounds")
        worst_fwd, worst_grad = max(worst_fwd, fwd), max(worst_grad, gerr)
        rows.append((name, meta["seed"], describe(config, dims, src_rows, tgt_rows), fwd, gerr))
    print(f"worst over all fixtures: forward {worst_fwd:.2e}, gradient {worst_grad:.2e}")
    write_readme(out_dir, rows)


def write_readme(out_dir, rows):
    lines = [
        "# PyTorch parity fixtures",
        "",
        "Generated by `scripts/pytorch_fixtures.py generate tests/fixtures` (see its docstring",
        f"for the file contract) with torch {torch.__version__}, on CPU. `NAME.safetensors` is the",
        "input of `cargo run --release --example pytorch_parity -- IN OUT`;",
        "`NAME.expected.safetensors` holds PyTorch's float64 reference (stored as f32) for",
        "`output`, `grad.src`, `grad.tgt` and `grad.<parameter>`. Padding rows list one string per",
        "batch row, 1 = padded; the source padding is also the memory padding.",
        "",
        "The last two columns are PyTorch's own f32 result against the f64 reference",
        "(max|f32 − f64| / max|f64|; forward, and the worst gradient tensor): the acceptance",
        "bounds are 2e-5 and 2e-4.",
        "",
        "| fixture | seed | config | f32 fwd | f32 grad |",
        "|---|---|---|---|---|",
    ]
    for name, seed, desc, fwd, gerr in rows:
        lines.append(f"| `{name}` | {seed} | {desc} | {fwd:.1e} | {gerr:.1e} |")
    (out_dir / "README.md").write_text("\n".join(lines) + "\n")


def compare(out_path, exp_path):
    got = load_file(str(out_path))
    ref = load_file(str(exp_path))
    failed = False
    print(f"{'tensor':60s} max|got-ref|/max|ref|   bound")
    for k in ["output"] + sorted(k for k in ref if k != "output"):
        bound = FORWARD_BOUND if k == "output" else GRAD_BOUND
        if k not in got:
            print(f"{k:60s} MISSING")
            failed = True
            continue
        if got[k].shape != ref[k].shape:
            print(f"{k:60s} SHAPE {tuple(got[k].shape)} != {tuple(ref[k].shape)}")
            failed = True
            continue
        e = rel_err(got[k], ref[k])
        bad = not (e <= bound)  # NaN fails
        failed |= bad
        print(f"{k:60s} {e:.3e}   {bound:.0e}{'  FAIL' if bad else ''}")
    print("FAIL" if failed else "OK")
    return 1 if failed else 0


def check(out_path, in_path):
    torch.backends.mha.set_fastpath_enabled(False)
    config, _ = config_from_file(in_path)
    inp = load_file(str(in_path))
    out = load_file(str(out_path))
    weights = {k[len("weights."):]: v for k, v in out.items() if k.startswith("weights.")}
    model = build_model(config)
    model.load_state_dict(weights, strict=True)  # raises on missing/unexpected/misshapen keys
    failed = False
    w_err = max(rel_err(weights[k], inp[k]) for k in model.state_dict())
    print(f"weights: max over tensors of max|OUT weights.<name> - IN <name>| / max|IN <name>| = {w_err:.3e}")
    failed |= not (w_err <= FORWARD_BOUND)
    model = model.double()
    src, tgt, grad_output, src_pad, tgt_pad = inputs_from(inp)
    res = run(model, config, src, tgt, grad_output, src_pad, tgt_pad)
    e = rel_err(out["output"], res["output"])
    print(f"OUT output vs PyTorch on OUT's weights: {e:.3e}")
    failed |= not (e <= FORWARD_BOUND)
    stem = str(in_path)
    exp_path = Path(stem[: -len(".safetensors")] + ".expected.safetensors")
    if exp_path.exists():
        ref = load_file(str(exp_path))
        e = rel_err(res["output"], ref["output"])
        print(f"PyTorch on OUT's weights vs reference {exp_path.name}: {e:.3e}")
        failed |= not (e <= FORWARD_BOUND)
    else:
        print(f"(no {exp_path.name} beside IN; reference comparison skipped)")
    print("FAIL" if failed else "OK")
    return 1 if failed else 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="write the fixtures into DIR")
    g.add_argument("dir")
    c = sub.add_parser("compare", help="OUT against an expected file")
    c.add_argument("out")
    c.add_argument("expected")
    k = sub.add_parser("check", help="weight round trip of OUT against IN")
    k.add_argument("out")
    k.add_argument("input")
    args = parser.parse_args()
    if args.cmd == "generate":
        generate(args.dir)
        return 0
    if args.cmd == "compare":
        return compare(args.out, args.expected)
    return check(args.out, args.input)


if __name__ == "__main__":
    sys.exit(main())
