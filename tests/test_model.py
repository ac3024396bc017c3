"""The reference model against the seed's own code, and the model family."""
import copy
import io
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import coatnet_fast
import seed_coatnet
from coatnet_fast import CoAtNet, create_model, list_models, set_backend
from coatnet_fast.ops import dispatch
from coatnet_fast.models import Attention, ConvBN, MBConv
from coatnet_fast.ops.rel_bias_attention import supported_reasons, table_rows
from reference import rel_bias_attention_reference, relative_error

SMALL = dict(num_blocks=(1, 1, 2, 2, 1), channels=(8, 12, 16, 32, 48), num_classes=10)


def randomize(model, seed=0):
    """Give the parameters the seed leaves at 0 or 1 (bias tables, norms, BN statistics) values that matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("relative_bias_table"):
                t.copy_(torch.randn(t.shape, generator=g))
            elif name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif name.endswith(("running_mean", "bias")) and t.is_floating_point():
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
            elif re.search(r"(norm\d|\.1)\.weight$", name) and t.dim() == 1:
                t.copy_(1 + 0.1 * torch.randn(t.shape, generator=g))
    return model


def test_same_seed_builds_the_same_weights_and_module_tree():
    torch.manual_seed(0)
    seed = seed_coatnet.CoAtNet()
    torch.manual_seed(0)
    ours = CoAtNet()
    assert list(ours.state_dict()) == list(seed.state_dict())
    for key, value in seed.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    seed_modules = dict(seed.named_modules())
    ours_modules = dict(ours.named_modules())
    assert list(ours_modules) == list(seed_modules)
    for name, module in seed_modules.items():
        if type(module).__module__.startswith("torch.nn"):
            assert isinstance(ours_modules[name], type(module)), name
        else:  # the seed's own classes: ours have the same names
            assert type(ours_modules[name]).__name__ == type(module).__name__, name


def test_state_dict_names_of_the_issue():
    keys = set(CoAtNet().state_dict())
    for key in [
        "s0.0.0.weight", "s1.0.downsample_layer.1.weight", "s1.0.block.expand_conv.0.weight",
        "s1.1.block.dw_conv.0.weight", "s1.1.block.dw_conv.1.running_var", "s2.0.block.se.fc.0.weight",
        "s2.2.block.pro_conv.1.bias", "s3.0.proj.weight", "s3.0.attn.relative_bias_table",
        "s3.0.attn.relative_index", "s3.1.attn.qkv.weight", "s3.1.attn.proj.0.bias", "s4.1.ffn.ffn.3.weight",
        "s4.1.norm1.weight", "s4.1.norm2.bias", "fc.weight",
    ]:
        assert key in keys, key


def _seed_and_ours(config):
    seed = randomize(seed_coatnet.CoAtNet(**config)).double()
    ours = CoAtNet(**config).double()
    ours.load_state_dict(seed.state_dict())  # a seed checkpoint loads unchanged
    return seed, ours


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_matches_seed_default_config_float64(mode):
    """The defaults ARE the seed model: same outputs, every gradient, BN statistics."""
    seed, ours = _seed_and_ours({})
    _compare_with_seed(seed, ours, mode, torch.randn(2, 3, 224, 224, dtype=torch.float64))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_matches_seed_small_config_float64(mode):
    config = dict(image_size=(96, 96), **SMALL)
    seed, ours = _seed_and_ours(config)
    _compare_with_seed(seed, ours, mode, torch.randn(3, 3, 96, 96, dtype=torch.float64))


def _compare_with_seed(seed, ours, mode, x):
    seed.train(mode == "train")
    ours.train(mode == "train")
    grad_out = torch.randn(x.shape[0], seed.fc.out_features, dtype=torch.float64)
    out_seed = seed(x)
    out_ours = ours(x)
    assert relative_error(out_ours, out_seed) < 1e-12
    if mode == "train":
        out_seed.backward(grad_out)
        out_ours.backward(grad_out)
        seed_params = dict(seed.named_parameters())
        for name, p in ours.named_parameters():
            assert p.grad is not None, name
            assert relative_error(p.grad, seed_params[name].grad) < 1e-10, name
    seed_buffers = dict(seed.named_buffers())
    for name, b in ours.named_buffers():
        assert torch.allclose(b, seed_buffers[name], rtol=1e-12, atol=0), name


def test_checkpoints_move_both_ways():
    seed = randomize(seed_coatnet.CoAtNet(image_size=(64, 64), **SMALL))
    buffer = io.BytesIO()
    torch.save(seed.state_dict(), buffer)
    buffer.seek(0)
    ours = CoAtNet(image_size=(64, 64), **SMALL)
    ours.load_state_dict(torch.load(buffer))
    back = seed_coatnet.CoAtNet(image_size=(64, 64), **SMALL)
    back.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 64, 64)
    seed.eval(), back.eval(), ours.eval()
    assert torch.equal(seed(x), back(x))
    assert relative_error(ours(x), seed(x)) < 1e-6


def test_attention_module_matches_independent_formula_non_square():
    attn = Attention(16, 24, (7, 5), heads=3, dim_head=8).double()
    with torch.no_grad():
        attn.relative_bias_table.normal_()
    x = torch.randn(2, 35, 16, dtype=torch.float64)
    q, k, v = (attn.qkv(x).view(2, 35, 3, 3, 8)[:, :, i].transpose(1, 2) for i in range(3))
    expected = rel_bias_attention_reference(q, k, v, attn.relative_bias_table, (7, 5), 8 ** -0.5)
    expected = attn.proj(expected.transpose(1, 2).reshape(2, 35, 24))
    assert relative_error(attn(x), expected) < 1e-12


def test_non_square_input_224x160():
    model = CoAtNet(image_size=(224, 160)).eval()
    assert model.s4[0].attn.relative_bias_table.shape == (table_rows((7, 5)), 8)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 160))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


def test_non_square_small_train_step():
    model = randomize(CoAtNet(image_size=(64, 96), **SMALL))
    out = model(torch.randn(2, 3, 64, 96))
    out.square().mean().backward()
    assert out.shape == (2, 10)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("image_size", [(200, 224), (224, 100), 48, (0, 32), (32, 32, 32), "224"])
def test_bad_image_size(image_size):
    with pytest.raises(ValueError, match="image_size"):
        CoAtNet(image_size=image_size)


def test_input_of_another_size_is_a_clear_error():
    model = CoAtNet(image_size=(64, 64), **SMALL)
    with pytest.raises(ValueError, match=r"x must have shape \[B, 3, 64, 64\].*got \(1, 3, 96, 64\)"):
        model(torch.randn(1, 3, 96, 64))
    with pytest.raises(ValueError, match=r"x must have shape"):
        model(torch.randn(3, 64, 64))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(channels=(64, 96, 192, 384)), "channels"),
        (dict(num_blocks=(2, 2, 0, 5, 2)), "num_blocks"),
        (dict(block_types=("C", "C", "T", "X")), "block_types"),
        (dict(heads=(8, 8, 8)), "heads"),
        (dict(dim_head=0), "dim_head"),
        (dict(drop_path_rate=1.5), "drop_path_rate"),
        (dict(backend="cuda"), "backend"),
    ],
)
def test_bad_constructor_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CoAtNet(image_size=(64, 64), **kwargs)


def test_drop_path_is_off_by_default_and_leaves_the_state_dict():
    plain = randomize(CoAtNet(image_size=(64, 64), **SMALL))
    torch.manual_seed(0)
    dropped = CoAtNet(image_size=(64, 64), drop_path_rate=0.3, **SMALL)
    assert list(dropped.state_dict()) == list(plain.state_dict())
    dropped.load_state_dict(plain.state_dict())
    rates = [blk.drop_path_rate for s in (dropped.s1, dropped.s2, dropped.s3, dropped.s4) for blk in s]
    assert rates == pytest.approx([0.3 * i / (len(rates) - 1) for i in range(len(rates))])
    assert all(blk.drop_path_rate == 0.0 for s in (plain.s1, plain.s2, plain.s3, plain.s4) for blk in s)

    x = torch.randn(4, 3, 64, 64)
    plain.eval(), dropped.eval()
    assert torch.equal(plain(x), dropped(x))  # identity at inference
    plain.train(), dropped.train()
    torch.manual_seed(1)
    assert not torch.allclose(plain(x), dropped(x))  # active in training


def test_variants_build_and_run_small():
    assert list_models() == ["coatnet_0", "coatnet_1", "coatnet_2", "coatnet_3", "coatnet_4", "seed"]
    for name in list_models():
        model = create_model(name, image_size=(64, 64), num_classes=10).eval()
        with torch.no_grad():
            out = model(torch.randn(1, 3, 64, 64))
        assert out.shape == (1, 10) and torch.isfinite(out).all(), name
        heads = coatnet_fast.MODEL_CONFIGS[name]["heads"]
        if name != "seed":
            widths = coatnet_fast.MODEL_CONFIGS[name]["channels"][1:]
            assert heads == tuple(w // 32 for w in widths)
            assert model.s4[0].attn.heads == widths[-1] // 32


def test_constructors_and_overrides():
    torch.manual_seed(0)
    a = coatnet_fast.coatnet_2(image_size=64, num_classes=5)
    torch.manual_seed(0)
    b = create_model("coatnet_2", image_size=(64, 64), num_classes=5)
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    assert a.fc.out_features == 5 and a.s0[0][0].out_channels == 128
    with pytest.raises(ValueError, match="unknown model 'coatnet_9'"):
        create_model("coatnet_9")


def test_readme_variant_table_matches_built_models():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for name in list_models():
        with torch.device("meta"):
            model = create_model(name)
        count = sum(p.numel() for p in model.parameters())
        row = re.search(rf"^\| `{name}` \|.*\| ([\d,]+) \|$", readme, re.M)
        assert row, f"README has no table row for {name}"
        assert int(row.group(1).replace(",", "")) == count, name


def test_meta_construction_does_not_poison_real_models():
    with torch.device("meta"):
        CoAtNet(image_size=(64, 64), **SMALL)
    model = CoAtNet(image_size=(64, 64), **SMALL)
    assert all(b.device.type == "cpu" for b in model.buffers())
    model(torch.randn(2, 3, 64, 64))


def test_model_on_device(device):
    model = randomize(CoAtNet(image_size=(64, 64), **SMALL)).double()
    reference = copy.deepcopy(model)
    moved = model.to(device)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    assert relative_error(moved(x.to(device)), reference(x)) < 1e-10


def _fused_ops(backend, device="cpu"):
    """The ops ``backend`` runs here on ``device`` (e.g. Triton takes CPU tensors only under
    the interpreter), judged by asking it about a small input of each op."""
    device = torch.device(device)
    ops = [op for op in dispatch.ops() if not dispatch.why_not(op, backend)]
    if "rel_bias_attention" in ops:
        q = torch.randn(1, 1, 4, 16, device=device)
        if supported_reasons(backend, q, q, q, torch.randn(9, 1, device=device), (2, 2)):
            ops.remove("rel_bias_attention")
    return ops


# Backends with a kernel for at least one op on this installation; which ops they take on a
# given device is decided inside each test (_fused_ops).
FUSED = [b for b in dispatch.BACKENDS if b != "eager" and any(not dispatch.why_not(op, b) for op in dispatch.ops())]


@pytest.mark.parametrize("backend", ["eager"] + FUSED)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_torch_compile_traces_the_model_without_graph_breaks(backend, mode, device):
    """fullgraph=True fails on any graph break, in the op dispatch or at a fused op."""
    import torch._dynamo

    ops = _fused_ops(backend, device)
    if not ops:
        assert backend != "eager"
        return  # this backend takes none of the model's ops on this device (see _fused_ops)
    torch._dynamo.reset()
    model = randomize(CoAtNet(image_size=(64, 64), **SMALL)).to(device).train(mode == "train")
    compiled_model = set_backend(copy.deepcopy(model), backend, ops)
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 64, 64, device=device)
    out, expected = compiled(x), model(x)
    assert relative_error(out, expected) < 1e-5
    if mode == "train":
        out.sum().backward()
        expected.sum().backward()
        params = dict(model.named_parameters())
        for name, p in compiled_model.named_parameters():
            assert relative_error(p.grad, params[name].grad) < 1e-4, name


def assert_output_and_input_grad_match(out, expected, x_fused, x):
    """The outputs (1e-5), then both backward from one random gradient and the inputs' (1e-4)."""
    assert relative_error(out, expected) < 1e-5
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    expected.backward(grad_out)
    assert relative_error(x_fused.grad, x.grad) < 1e-4


def assert_grads_and_buffers_match(fused, reference):
    """Every parameter's gradient (1e-4) and every buffer, running statistics included (1e-5)."""
    params = dict(reference.named_parameters())
    for name, p in fused.named_parameters():
        assert relative_error(p.grad, params[name].grad) < 1e-4, name
    buffers = dict(reference.named_buffers())
    for name, b in fused.named_buffers():
        assert relative_error(b.float(), buffers[name].float()) < 1e-5, name


def fused_in_training(model):
    """``model`` with its ConvBN blocks fused in training too (by default they are in eval only)."""
    for module in model.modules():
        if isinstance(module, ConvBN):
            module.fused_in_training = True
    return model


@pytest.mark.parametrize("backend", FUSED)
def test_model_on_fused_backend_matches_eager(backend, device):
    """Train (3 steps: outputs, every gradient, BN statistics) and eval, fp32, same weights;
    every fused op in both (ConvBN's in training too, ``fused_in_training``)."""
    ops = _fused_ops(backend, device)
    if not ops:
        return  # this backend takes none of the model's ops on this device (see _fused_ops)
    reference = randomize(CoAtNet(image_size=(64, 96), **SMALL)).to(device)
    fused = fused_in_training(set_backend(copy.deepcopy(reference), backend, ops))
    for step in range(3):
        x = torch.randn(2, 3, 64, 96, device=device)
        out, expected = fused(x), reference(x)
        assert relative_error(out, expected) < 1e-4, step
        grad_out = torch.randn_like(out)
        out.backward(grad_out)
        expected.backward(grad_out)
        params = dict(reference.named_parameters())
        for name, p in fused.named_parameters():
            assert relative_error(p.grad, params[name].grad) < 1e-4, (step, name)
            p.grad = params[name].grad = None
    buffers = dict(reference.named_buffers())
    for name, b in fused.named_buffers():
        assert relative_error(b.float(), buffers[name].float()) < 1e-5, name
    fused.eval(), reference.eval()
    x = torch.randn(3, 3, 64, 96, device=device)
    assert relative_error(fused(x), reference(x)) < 1e-4


def _is_channels_last(t):
    """Channels are the innermost dimension (strictly: sizes of 1 leave both layouts contiguous)."""
    return t.stride(1) == 1 and t.stride(3) == t.shape[1]


@pytest.mark.parametrize("backend", FUSED)
def test_fused_model_runs_channels_last_end_to_end(backend, device, monkeypatch):
    """Given channels_last weights and input, every 4-D activation of the fused model (each
    module's output, each fused op's input and output) stays channels_last, with no conversion
    back to NCHW on the way, and so do the gradients of the input, of every conv weight and
    those the fused ops' backwards receive (their kernels' tiles are channels_last); the result
    matches the NCHW eager model."""
    ops = _fused_ops(backend, device)
    if not ops:
        return  # this backend takes none of the model's ops on this device (see _fused_ops)
    reference = randomize(CoAtNet(image_size=(64, 64), **SMALL)).to(device)
    fused = fused_in_training(set_backend(copy.deepcopy(reference), backend, ops)).to(memory_format=torch.channels_last)
    not_channels_last = []

    def check(where, t):
        if isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[1] > 1 and t.shape[2] * t.shape[3] > 1:
            if not _is_channels_last(t):
                not_channels_last.append((where, tuple(t.shape), t.stride()))

    for name, module in fused.named_modules():
        module.register_forward_hook(lambda m, args, out, name=name: check(name or "model", out))
    fused_calls = []
    for op in ("dwconv_bn_gelu", "batch_norm_act"):
        if op not in ops:
            continue
        entry = dispatch._TABLE[op][backend]

        def spy(*args, op=op, impl=entry.impl, **kwargs):
            fused_calls.append(op)
            check(f"{op} input", args[0])
            out = impl(*args, **kwargs)
            y = out[0] if isinstance(out, tuple) else out
            check(f"{op} output", y)
            if y.requires_grad:  # what the op's backward receives: read across its tiles if not channels_last
                y.register_hook(lambda grad, op=op: check(f"{op} output's gradient", grad))
            return out

        monkeypatch.setitem(dispatch._TABLE[op], backend,
                            dispatch.OpBackend(entry.op, backend, spy, entry.available, entry.reasons))
    x = torch.randn(2, 3, 64, 64, device=device)
    x_cl = x.to(memory_format=torch.channels_last).requires_grad_(True)
    x.requires_grad_(True)
    out, expected = fused(x_cl), reference(x)
    assert not not_channels_last, not_channels_last
    assert set(fused_calls) == {"dwconv_bn_gelu", "batch_norm_act"} & set(ops)
    assert relative_error(out, expected) < 1e-4
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    expected.backward(grad_out)
    assert not not_channels_last, not_channels_last
    assert _is_channels_last(x_cl.grad)
    assert relative_error(x_cl.grad, x.grad) < 1e-4
    params = dict(reference.named_parameters())
    for name, p in fused.named_parameters():
        if p.dim() == 4:
            assert p.grad.is_contiguous(memory_format=torch.channels_last), name
        assert relative_error(p.grad, params[name].grad) < 1e-4, name


@pytest.mark.parametrize("backend", [b for b in FUSED if not dispatch.why_not("rel_bias_attention", b)])
def test_attention_module_hands_the_op_strided_views(backend, monkeypatch):
    """No copy between the qkv projection and the fused op: q, k, v arrive as its views."""
    seen = []
    entry = dispatch._TABLE["rel_bias_attention"][backend]

    def spy(q, k, v, *rest):
        seen.append((q.stride(), k.data_ptr() - q.data_ptr(), v.data_ptr() - q.data_ptr(), q.element_size()))
        return entry.impl(q, k, v, *rest)

    monkeypatch.setitem(dispatch._TABLE["rel_bias_attention"], backend,
                        dispatch.OpBackend(entry.op, backend, spy, entry.available, entry.reasons))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert "rel_bias_attention" in _fused_ops(backend, device)
    attn = Attention(16, 24, (7, 5), heads=3, dim_head=16, backend=backend).to(device)
    attn(torch.randn(2, 35, 16, device=device))
    (stride, k_off, v_off, size), = seen
    inner = 3 * 16
    assert stride == (35 * 3 * inner, 16, 3 * inner, 1)
    assert (k_off, v_off) == (inner * size, 2 * inner * size)


@pytest.mark.parametrize("backend", [b for b in FUSED if not dispatch.why_not("dwconv_bn_gelu", b)])
def test_mbconv_takes_se_squeeze_from_the_fused_kernel(backend, monkeypatch):
    """On a fused backend the SE block's average pool comes from the depthwise kernel's
    epilogue (pool=True), and the block still matches eager."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert "dwconv_bn_gelu" in _fused_ops(backend, device)
    calls = []
    entry = dispatch._TABLE["dwconv_bn_gelu"][backend]

    def spy(*args, **kwargs):
        calls.append(kwargs.get("pool", False))
        return entry.impl(*args, **kwargs)

    monkeypatch.setitem(dispatch._TABLE["dwconv_bn_gelu"], backend,
                        dispatch.OpBackend(entry.op, backend, spy, entry.available, entry.reasons))
    block = randomize(MBConv(12, 16, (8, 8), downsample=True)).to(device)
    fused = set_backend(copy.deepcopy(block), backend, ["dwconv_bn_gelu"])
    x = torch.randn(2, 12, 16, 16, device=device)
    out, expected = fused(x), block(x)
    assert calls == [True]
    assert relative_error(out, expected) < 1e-5


@pytest.mark.parametrize("backend", [b for b in FUSED if not dispatch.why_not("batch_norm_act", b)])
def test_mbconv_fuses_the_projection_residual_and_drop_path(backend, monkeypatch):
    """On a fused backend MBConv's projection BatchNorm takes the stochastic-depth scale and the
    residual add (one batch_norm_act call with both), and its expand BatchNorm the GELU; with
    the same RNG state the block draws the same per-sample mask as eager and matches it,
    gradients and running statistics included."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    calls = []
    entry = dispatch._TABLE["batch_norm_act"][backend]

    def spy(*args):
        calls.append((args[8], args[9] is not None, args[10] is not None))  # activation, residual, scale
        return entry.impl(*args)

    monkeypatch.setitem(dispatch._TABLE["batch_norm_act"], backend,
                        dispatch.OpBackend(entry.op, backend, spy, entry.available, entry.reasons))
    for downsample in (True, False):
        block = randomize(MBConv(12, 12, (8, 8), downsample=downsample, drop_path_rate=0.5)).to(device)
        fused = fused_in_training(set_backend(copy.deepcopy(block), backend, ["batch_norm_act"]))
        x = torch.randn(8, 12, 16 if downsample else 8, 16 if downsample else 8, device=device)
        x_fused = x.clone().requires_grad_(True)
        x.requires_grad_(True)
        torch.manual_seed(3)
        expected = block(x)
        torch.manual_seed(3)
        calls.clear()
        out = fused(x_fused)
        assert calls == [("gelu", False, False), ("identity", True, True)]
        assert_output_and_input_grad_match(out, expected, x_fused, x)
        assert_grads_and_buffers_match(fused, block)


@pytest.mark.parametrize("backend", [b for b in FUSED if not dispatch.why_not("batch_norm_act", b)])
def test_conv_bn_blocks_fuse_in_eval_and_in_training_only_when_asked(backend, monkeypatch):
    """By default a fused backend's ConvBN blocks (stem, MBConv expand and projection) call
    batch_norm_act in eval and run the seed's modules in training (measured faster on an H200,
    see ConvBN.fused_in_training); with fused_in_training they call it in both. Each way the
    block matches eager: output, gradients and running statistics."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    calls = []
    entry = dispatch._TABLE["batch_norm_act"][backend]

    def spy(*args):
        calls.append(args[5])  # training
        return entry.impl(*args)

    monkeypatch.setitem(dispatch._TABLE["batch_norm_act"], backend,
                        dispatch.OpBackend(entry.op, backend, spy, entry.available, entry.reasons))
    block = randomize(MBConv(12, 12, (8, 8), downsample=False)).to(device)
    for fuse_training in (False, True):
        fused = set_backend(copy.deepcopy(block), backend, ["batch_norm_act"])
        if fuse_training:
            fused_in_training(fused)
        expected_block = copy.deepcopy(block)
        for training in (True, False):
            fused.train(training), expected_block.train(training)
            x = torch.randn(4, 12, 8, 8, device=device)
            x_fused = x.clone().requires_grad_(True)
            x.requires_grad_(True)
            calls.clear()
            out, expected = fused(x_fused), expected_block(x)
            assert calls == ([training, training] if fuse_training or not training else []), (fuse_training, training)
            assert_output_and_input_grad_match(out, expected, x_fused, x)
        assert_grads_and_buffers_match(fused, expected_block)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_gated_pointwise_conv_is_the_gated_1x1_conv(channels_last):
    """conv2d(x * gate, W) as one batched GEMM with per-image weights: against float64 eager,
    output and the gradients of x, gate and W; the output keeps x's layout without a copy of x."""
    from coatnet_fast.models.layers import gated_pointwise_conv

    g = torch.Generator().manual_seed(0)
    x64 = torch.randn(3, 6, 5, 7, generator=g, dtype=torch.float64)
    gate64 = torch.rand(3, 6, generator=g, dtype=torch.float64)
    w64 = torch.randn(4, 6, 1, 1, generator=g, dtype=torch.float64)
    dy = torch.randn(3, 4, 5, 7, generator=g, dtype=torch.float64)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    inputs = [x64.float().contiguous(memory_format=fmt).requires_grad_(True), gate64.float().requires_grad_(True),
              w64.float().requires_grad_(True)]
    ref_inputs = [t.clone().requires_grad_(True) for t in (x64, gate64, w64)]
    out = gated_pointwise_conv(*inputs)
    ref = torch.nn.functional.conv2d(ref_inputs[0] * ref_inputs[1][:, :, None, None], ref_inputs[2])
    assert out.is_contiguous(memory_format=fmt)
    assert relative_error(out, ref) < 1e-6
    for name, a, b in zip(("dx", "dgate", "dweight"), torch.autograd.grad(out, inputs, dy.float()),
                          torch.autograd.grad(ref, ref_inputs, dy)):
        assert relative_error(a, b) < 1e-5, name


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_conv_bn_pads_its_input_channels_on_a_fused_backend(training, monkeypatch):
    """ConvBN.pad_input_channels (the stem's 3 channels to 8): on a fused backend the conv runs on
    zero-padded channels, and output, the gradients of x, the conv weight and BatchNorm's
    parameters, and the running statistics match the seed's modules in float64; eager and
    channel counts already a multiple stay unpadded; the state dict is the seed's."""
    from coatnet_fast.models import ConvBN

    g = torch.Generator().manual_seed(7)
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
    fused = ConvBN(3, 8, 3, 2)
    with torch.no_grad():
        for t in (fused[1].weight, fused[1].bias, fused[1].running_mean):
            t.copy_(torch.randn(t.shape, generator=g))
        fused[1].running_var.copy_(torch.rand(8, generator=g) + 0.5)
    expected = copy.deepcopy(fused).double()
    fused.backend, fused.pad_input_channels = "triton", 8
    fused.train(training)
    expected.train(training)
    assert list(fused.state_dict()) == list(expected.state_dict())

    seen = []
    real_conv2d = torch.nn.functional.conv2d
    monkeypatch.setattr(torch.nn.functional, "conv2d", lambda x, w, *a: seen.append((x.shape[1], w.shape[1])) or
                        real_conv2d(x, w, *a))
    x64 = torch.randn(2, 3, 9, 11, generator=g, dtype=torch.float64)
    x = x64.float().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    x_ref = x64.clone().requires_grad_(True)
    out = fused(x)
    assert seen == [(8, 8)], seen  # the padded conv ran, on 8 input channels
    ref = expected(x_ref)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(out, ref) < 1e-5
    dy = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    out.backward(dy.float())
    ref.backward(dy)
    assert relative_error(x.grad, x_ref.grad) < 1e-5
    for (name, a), b in zip(fused.named_parameters(), expected.parameters()):
        assert a.grad is not None and relative_error(a.grad, b.grad) < 1e-4, name
    assert fused[0].weight.grad.shape == (8, 3, 3, 3)
    for (name, a), b in zip(fused.named_buffers(), expected.buffers()):
        assert relative_error(a.double(), b) < 1e-5 if a.is_floating_point() else torch.equal(a, b), name
    # Eager is the seed's module, unpadded; so is a conv whose channels are a multiple already.
    seen.clear()
    fused.backend = "eager"
    fused(x)
    wide = ConvBN(8, 4, 3, 1, backend="triton")
    wide.pad_input_channels = 8
    wide.train(training)(torch.randn(1, 8, 5, 5, generator=g))
    assert seen == [(3, 3), (8, 8)], seen


def test_fused_mbconv_keeps_no_gated_activation_for_the_backward():
    """On a fused path SE's gate goes into the projection's weights: autograd keeps the depthwise
    output once, and nothing of its size is written for the gated product."""
    block = randomize(MBConv(8, 8, (6, 6))).train()
    if dispatch.why_not("dwconv_bn_gelu", "triton") or dispatch.why_not("batch_norm_act", "triton"):
        assert not torch.cuda.is_available()
        return  # no Triton here (nor its interpreter): nothing fused to check
    fused = fused_in_training(set_backend(copy.deepcopy(block), "triton"))
    x = torch.randn(2, 8, 6, 6)
    hidden = (2, 32, 6, 6)

    def kept_hidden(model):
        storages = set()

        def pack(t):
            if t.numel() == torch.Size(hidden).numel():
                storages.add(t.untyped_storage()._cdata)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
        return len(storages)

    # Eager keeps the expand conv's output, the BN output (GELU's input), the depthwise input, its
    # conv output, BN output, the GELU output (SE's multiply) and the gated product (the projection's
    # input); fused: the expand conv's output, the depthwise input and the depthwise output.
    assert kept_hidden(block) > kept_hidden(fused) == 3


@pytest.mark.parametrize("side", [2, 4], ids=["small-multiplies", "large-folds"])
def test_projection_forward_gated_matches_the_gated_modules(side, monkeypatch):
    """ConvBN.forward_gated folds the gate into per-image weights when H * W >= C_out
    (side 4: 16 >= 8) and multiplies the activation otherwise (side 2): both match the seed's
    modules on x * gate, with the residual added."""
    from coatnet_fast.models import ConvBN
    from coatnet_fast.models import layers

    folded = []
    real = layers.gated_pointwise_conv
    monkeypatch.setattr(layers, "gated_pointwise_conv", lambda *a: folded.append(1) or real(*a))
    torch.manual_seed(0)
    module = randomize(ConvBN(6, 8, gelu=False))
    plain = copy.deepcopy(torch.nn.Sequential(*module))
    x, gate = torch.randn(3, 6, side, side), torch.rand(3, 6)
    res = torch.randn(3, 8, side, side)
    out = module.forward_gated(x, gate, residual=res)
    assert len(folded) == (side == 4)
    assert relative_error(out, res + plain(x * gate[:, :, None, None])) < 1e-6
