"""The fused ops are registered custom ops: torch.library.opcheck passes (schema, fake tensors,
autograd registration), and dynamo traces a model with every flag on without a graph break."""
import pytest
import torch

from conftest import DEVICE
from kernels import dense
from kernels import layer_norm as ln
from kernels import mlp
from kernels import spatial_mlp as sm
from kernels import window_attention as wa
from kernels import window_process as wp
from models.swin_transformer import SwinTransformer, relative_position_index, shifted_window_mask

CHECKS = ('test_schema', 'test_faketensor', 'test_autograd_registration')


def test_opcheck_window_process():
    x = torch.randn(2, 8, 8, 5, device=DEVICE, requires_grad=True)
    torch.library.opcheck(wp._window_partition_op, (x, 4, 2), test_utils=CHECKS)
    win = torch.randn(8, 4, 4, 5, device=DEVICE, requires_grad=True)
    torch.library.opcheck(wp._window_merge_op, (win, 8, 8, 2), test_utils=CHECKS)


def test_opcheck_window_attention():
    qkv = torch.randn(8, 16, 3 * 32, device=DEVICE, requires_grad=True)
    table = torch.randn(49, 2, device=DEVICE, requires_grad=True)
    mask = shifted_window_mask(8, 8, 4, 2).to(DEVICE)
    torch.library.opcheck(wa._fwd_op, (qkv, table, relative_position_index(4).to(DEVICE), mask, 2, 0.25),
                          test_utils=CHECKS)
    tau = torch.tensor([3.0, 11.0], device=DEVICE, requires_grad=True)        # Swin V2's per-head scale
    torch.library.opcheck(wa._fwd_op, (qkv, table, relative_position_index(4).to(DEVICE), mask, 2, 1.0, tau, True),
                          test_utils=CHECKS)


def test_opcheck_layer_norm():
    x = torch.randn(6, 40, device=DEVICE, requires_grad=True)
    w = torch.randn(40, device=DEVICE, requires_grad=True)
    b = torch.randn(40, device=DEVICE, requires_grad=True)
    torch.library.opcheck(ln._fwd_op, (x, w, b, 1e-5, False, []), test_utils=CHECKS)
    strided = torch.randn(2, 40, 6, device=DEVICE).transpose(1, 2).requires_grad_()   # as patch_embed gives
    torch.library.opcheck(ln._fwd_op, (strided, w, b, 1e-5, False, []), test_utils=CHECKS)
    tokens = torch.randn(2, 6 * 4, 40, device=DEVICE, requires_grad=True)     # norm1 into window layout
    torch.library.opcheck(ln._fwd_op, (tokens, w, b, 1e-5, False, [6, 4, 2, 1]), test_utils=CHECKS)


def test_opcheck_spatial_mlp():
    x = torch.randn(2, 8, 8, 16, device=DEVICE, requires_grad=True)
    weight = torch.randn(2 * 16, 16, 1, device=DEVICE, requires_grad=True)
    bias = torch.randn(2 * 16, device=DEVICE, requires_grad=True)
    for b, shift in ((bias, 2), (None, 0)):
        torch.library.opcheck(sm._fwd_op, (x, weight, b, 2, 4, shift), test_utils=CHECKS)


def test_no_graph_breaks_with_every_flag():
    model = SwinTransformer(img_size=32, patch_size=2, embed_dim=32, depths=(2, 2), num_heads=(2, 4),
                            window_size=4, num_classes=10, fused_window_process=True, fused_attention=True,
                            fused_layernorm=True, fused_mlp=True, fused_dense=True,
                            kernel_backend='triton').to(DEVICE)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(torch.randn(2, 3, 32, 32, device=DEVICE))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_opcheck_add_layer_norm():
    shortcut = torch.randn(3, 4, 40, device=DEVICE, requires_grad=True)
    branch = torch.randn(3, 4, 40, device=DEVICE, requires_grad=True)
    scale = torch.tensor([0., 2., 2.], device=DEVICE).view(3, 1, 1)
    w = torch.randn(40, device=DEVICE, requires_grad=True)
    b = torch.randn(40, device=DEVICE, requires_grad=True)
    for s in (scale, None):
        torch.library.opcheck(ln._add_fwd_op, (shortcut, branch, s, w, b, 1e-5, False, []), test_utils=CHECKS)
    windows = torch.randn(3, 2, 2, 40, device=DEVICE, requires_grad=True)   # merge from window layout
    torch.library.opcheck(ln._add_fwd_op, (shortcut, windows, scale, w, b, 1e-5, False, [2, 2, 2, 1]),
                          test_utils=CHECKS)
    for s in (scale, None):     # the MLP's residual + norm1 + partition: y to window layout
        torch.library.opcheck(ln._add_fwd_op, (shortcut, branch, s, w, b, 1e-5, False, [2, 2, 2, 1, 1]),
                              test_utils=CHECKS)
    # Swin V2's post-norm residual, plain and merging from window layout, and with the next block's partition
    for s in (scale, None):
        torch.library.opcheck(ln._post_part_fwd_op, (shortcut, branch, s, w, b, 1e-5, False, [2, 2, 2, 1, 1]),
                              test_utils=CHECKS)
    torch.library.opcheck(ln._post_fwd_op, (shortcut, branch, scale, w, b, 1e-5, False, []), test_utils=CHECKS)
    torch.library.opcheck(ln._post_fwd_op, (shortcut, windows, None, w, b, 1e-5, False, [2, 2, 2, 1]),
                          test_utils=CHECKS)


def test_opcheck_mlp_and_dense():
    x = torch.randn(10, 16, device=DEVICE, requires_grad=True)
    w1, b1 = torch.randn(32, 16, device=DEVICE, requires_grad=True), torch.randn(32, device=DEVICE, requires_grad=True)
    w2, b2 = torch.randn(16, 32, device=DEVICE, requires_grad=True), torch.randn(16, device=DEVICE, requires_grad=True)
    torch.library.opcheck(mlp._fwd_op, (x, w1, b1, w2, b2), test_utils=CHECKS)
    torch.library.opcheck(dense._fwd_op, (x, w1, b1), test_utils=CHECKS)
    torch.library.opcheck(dense._fwd_op, (x, w1, None), test_utils=CHECKS)


def _reference_and_fused():
    """A small reference Swin and the same weights with all five flags on the Triton kernels."""
    torch.manual_seed(0)
    small = dict(img_size=32, patch_size=2, embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=4,
                 num_classes=10, drop_path_rate=0.0)
    ref = SwinTransformer(**small).to(DEVICE)
    fused = SwinTransformer(**small, fused_window_process=True, fused_attention=True, fused_layernorm=True,
                            fused_mlp=True, fused_dense=True, kernel_backend='triton').to(DEVICE)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def _assert_compiled_matches(ref, fused):
    """`fused` compiled (aot_eager on the CPU, inductor on CUDA), fullgraph: output and every parameter
    gradient of one forward + backward against the uncompiled `ref`."""
    torch._dynamo.reset()
    compiled = torch.compile(fused, backend='aot_eager' if DEVICE == 'cpu' else 'inductor', fullgraph=True)
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    g = torch.randn(2, 10, device=DEVICE)
    out_ref, out = ref(x), compiled(x)
    (out_ref * g).sum().backward()
    (out * g).sum().backward()
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-5)
    _assert_same_grads(fused, ref)


def _assert_same_grads(fused, ref, msg=''):
    ref_grads = dict(ref.named_parameters())
    for name, p in fused.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, ref_grads[name].grad, rtol=1e-3, atol=1e-5, msg=f'{name}{msg}')


def test_compiled_backward_with_every_flag_matches_reference():
    """torch.compile (aot_eager on the CPU, inductor on CUDA), fullgraph, with all five flags on the
    Triton kernels: forward and every parameter gradient against the uncompiled reference model.
    This runs each custom op's registered backward under AOT autograd, as --compile does."""
    from kernels.layer_norm import add_layer_norm_partition, layer_norm_partition, merge_add_layer_norm
    ref, fused = _reference_and_fused()
    assert dict(fused.ops.chosen) == {op: 'triton' for op in ('window_process', 'window_attention', 'layer_norm',
                                                              'add_layer_norm', 'norm_partition', 'merge_add_norm',
                                                              'add_norm_partition', 'mlp', 'dense')}
    assert fused.ops.norm_partition is layer_norm_partition and fused.ops.merge_add_norm is merge_add_layer_norm
    assert fused.ops.add_norm_partition is add_layer_norm_partition and fused.ops.defer_mlp_residual
    _assert_compiled_matches(ref, fused)


@pytest.mark.parametrize('model_type', ['swin_mlp', 'swinv2'])
def test_compiled_swin_mlp_and_v2_with_their_flags_match_reference(model_type):
    """Swin-MLP (four flags apply) and Swin V2 (all five) compiled (aot_eager on the CPU, inductor on CUDA),
    fullgraph: forward and every parameter gradient against the uncompiled reference; the fused spatial
    MLP and the deferred MLP residual (Swin-MLP), the merge and the next block's partition inside the
    post-norm residual kernels (V2) included. No drop-path: inductor draws its own random numbers."""
    from models.swin_mlp import SwinMLP
    from models.swin_transformer_v2 import SwinTransformerV2
    cls, flags = ((SwinMLP, {}) if model_type == 'swin_mlp' else (SwinTransformerV2, dict(fused_attention=True)))
    kw = dict(img_size=32, patch_size=2, embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=4,
              num_classes=10, drop_path_rate=0.0)
    torch.manual_seed(0)
    ref = cls(**kw).to(DEVICE)
    fused = cls(**kw, **flags, fused_window_process=True, fused_layernorm=True, fused_mlp=True, fused_dense=True,
                kernel_backend='triton').to(DEVICE)
    with torch.no_grad():           # the init zeroes biases and sets norm weights to one: make them count
        for p in ref.parameters():
            if p.ndim == 1:
                p.normal_()
    fused.load_state_dict(ref.state_dict())
    block = fused.layers[0].blocks[0]
    if model_type == 'swin_mlp':
        assert dict(fused.ops.chosen)['spatial_mlp'] == 'triton' and block.defers_mlp_residual
    else:
        assert dict(fused.ops.chosen)['post_norm_add_partition'] == 'triton' and block.carries_windows
    _assert_compiled_matches(ref, fused)


@pytest.mark.skipif(DEVICE != 'cuda', reason="CUDA graph trees need CUDA")
def test_reduce_overhead_compile_trains_a_model_whose_kernels_never_ran():
    """torch.compile mode 'reduce-overhead' (CUDA graph trees: EXTRA.COMPILE_MODE, the benchmarks' best
    configuration) on a model no kernel has seen: what a kernel caches during the trees' warm-up run
    must not live in the graph's memory pool (the trees then refuse to record: the window attention's
    table-gradient positions did). Three training steps (warm-up, record, replay), each's output and
    every gradient against the uncompiled reference."""
    ref, fused = _reference_and_fused()
    wa._POSITIONS.clear()
    torch._dynamo.reset()
    compiled = torch.compile(fused, mode='reduce-overhead', fullgraph=True)
    for step in range(3):
        x = torch.randn(2, 3, 32, 32, device=DEVICE)
        g = torch.randn(2, 10, device=DEVICE)
        for m in (ref, fused):
            m.zero_grad(set_to_none=True)
        torch.compiler.cudagraph_mark_step_begin()
        out = compiled(x)
        (out * g).sum().backward()
        out_ref = ref(x)
        (out_ref * g).sum().backward()
        torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-5, msg=f'step {step}')
        _assert_same_grads(fused, ref, f', step {step}')


def test_no_graph_breaks_swinv2_and_swin_mlp_with_their_flags():
    from models.swin_mlp import SwinMLP
    from models.swin_transformer_v2 import SwinTransformerV2
    small = dict(img_size=32, patch_size=2, embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=4,
                 num_classes=10, fused_window_process=True, fused_layernorm=True, fused_mlp=True, fused_dense=True,
                 kernel_backend='triton')
    for cls, extra in ((SwinTransformerV2, dict(fused_attention=True)), (SwinMLP, {})):
        model = cls(**small, **extra).to(DEVICE)
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(model)(torch.randn(2, 3, 32, 32, device=DEVICE))
        assert explanation.graph_break_count == 0, (cls.__name__, explanation.break_reasons)


def _grads_of(fn, inputs, upstream):
    """Outputs and the gradient of every differentiable input for one call of `fn`."""
    leaves = [t.detach().clone().requires_grad_() if t.is_floating_point() else t for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, [upstream(o) for o in outs])
    return [o.detach() for o in outs] + [t.grad for t in leaves if t.is_floating_point()]


def _same(eager, op_path):
    for a, b in zip(eager, op_path):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))


def test_eager_and_custom_op_paths_give_identical_gradients():
    """Each op's two autograd paths (the autograd.Function eager code calls, and the custom op with
    its registered backward that torch.compile traces) run one shared backward: bit-identical
    results, incl. add_layer_norm's shortcut where the branch's gradient is the shortcut's tensor,
    its drop-path scale and its window layout."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    up = lambda o: torch.randn(o.shape, generator=g).to(o)                     # noqa: E731
    w, b = torch.randn(40, device=DEVICE), torch.randn(40, device=DEVICE)
    x = torch.randn(2, 24, 40, device=DEVICE)
    for window in ([], [6, 4, 2, 1]):
        g.manual_seed(1)
        eager = _grads_of(lambda x, w, b: ln._LayerNorm.apply(x, w, b, 1e-5, False, window), (x, w, b), up)
        g.manual_seed(1)
        via_op = _grads_of(lambda x, w, b: ln._fwd_op(x, w, b, 1e-5, False, window)[0], (x, w, b), up)
        _same(eager, via_op)
    branch_windows = torch.randn(12, 2, 2, 40, device=DEVICE)
    scale = torch.rand(2, 1, 1, device=DEVICE)
    for branch, s, window in ((x, None, []), (x, scale, []), (branch_windows, None, [6, 4, 2, 1])):
        g.manual_seed(1)
        eager = _grads_of(lambda a, c, w, b: ln._AddLayerNorm.apply(a, c, s, w, b, 1e-5, False, window),
                          (x, branch, w, b), up)
        g.manual_seed(1)
        via_op = _grads_of(lambda a, c, w, b: ln._add_fwd_op(a, c, s, w, b, 1e-5, False, window)[:2],
                           (x, branch, w, b), up)
        _same(eager, via_op)
    for branch, s, window in ((x, scale, []), (branch_windows, None, [6, 4, 2, 1])):
        g.manual_seed(1)
        eager = _grads_of(lambda a, c, w, b: ln._PostNormAdd.apply(a, c, s, w, b, 1e-5, False, window),
                          (x, branch, w, b), up)
        g.manual_seed(1)
        via_op = _grads_of(lambda a, c, w, b: ln._post_fwd_op(a, c, s, w, b, 1e-5, False, window)[0],
                           (x, branch, w, b), up)
        _same(eager, via_op)
    for s in (scale, None):     # V2's MLP residual with the next block's partition
        g.manual_seed(1)
        eager = _grads_of(lambda a, c, w, b: ln._PostNormAddPartition.apply(a, c, s, w, b, 1e-5, False,
                                                                              [6, 4, 2, 1, 1]), (x, x * 2, w, b), up)
        g.manual_seed(1)
        via_op = _grads_of(lambda a, c, w, b: ln._post_part_fwd_op(a, c, s, w, b, 1e-5, False, [6, 4, 2, 1, 1])[:2],
                           (x, x * 2, w, b), up)
        _same(eager, via_op)
    x2 = torch.randn(10, 16, device=DEVICE)
    w1, b1 = torch.randn(32, 16, device=DEVICE), torch.randn(32, device=DEVICE)
    w2, b2 = torch.randn(16, 32, device=DEVICE), torch.randn(16, device=DEVICE)
    for eager_fn, op_fn, args in (
            (mlp._Mlp.apply, lambda *a: mlp._fwd_op(*a)[0], (x2, w1, b1, w2, b2)),
            (dense._Dense.apply, dense._fwd_op, (x2, w1, b1))):
        g.manual_seed(1)
        eager = _grads_of(eager_fn, args, up)
        g.manual_seed(1)
        _same(eager, _grads_of(op_fn, args, up))
    qkv = torch.randn(8, 16, 3 * 32, device=DEVICE)
    table = torch.randn(49, 2, device=DEVICE)
    index, mask = relative_position_index(4).to(DEVICE), shifted_window_mask(8, 8, 4, 2).to(DEVICE)
    g.manual_seed(1)
    eager = _grads_of(lambda q, t: wa._WindowAttention.apply(q, t, index, mask, 2, 0.25, None, False), (qkv, table), up)
    g.manual_seed(1)
    _same(eager, _grads_of(lambda q, t: wa._fwd_op(q, t, index, mask, 2, 0.25)[0], (qkv, table), up))
    tau = torch.tensor([3.0, 11.0], device=DEVICE)
    g.manual_seed(1)
    eager = _grads_of(lambda q, t, s: wa._WindowAttention.apply(q, t, index, mask, 2, 1.0, s, True), (qkv, table, tau),
                      up)
    g.manual_seed(1)
    _same(eager, _grads_of(lambda q, t, s: wa._fwd_op(q, t, index, mask, 2, 1.0, s, True)[0], (qkv, table, tau), up))
    xs = torch.randn(2, 8, 8, 5, device=DEVICE)
    g.manual_seed(1)
    eager = _grads_of(lambda t: wp._WindowPartition.apply(t, 4, 2), (xs,), up)
    g.manual_seed(1)
    _same(eager, _grads_of(lambda t: wp._window_partition_op(t, 4, 2), (xs,), up))
    xm = torch.randn(2, 8, 8, 16, device=DEVICE)            # Swin-MLP's spatial MLP, shifted
    wm, bm = torch.randn(2 * 16, 16, 1, device=DEVICE), torch.randn(2 * 16, device=DEVICE)
    g.manual_seed(1)
    eager = _grads_of(lambda t, w, b: sm._SpatialMLP.apply(t, w, b, 2, 4, 2), (xm, wm, bm), up)
    g.manual_seed(1)
    _same(eager, _grads_of(lambda t, w, b: sm._fwd_op(t, w, b, 2, 4, 2), (xm, wm, bm), up))
