"""Window attention's key tiling: one power-of-2 key tile vs keys in blocks of 64, per window size.

Window 12 (144 tokens) pads to 256 keys in one tile, to 192 in blocks of 64 (the tiled path also
walks the keys per window in the backward and, for Swin V2 in half precision, adds a pre-pass for
D_i). This times forward and forward + backward at Swin's shapes (bf16, batch 128) both ways, V1
and V2 (per-head scale), and prints which wins: kernels/window_attention.py's KEY_TILE_ABOVE.

    python benchmarks/tune_window_attention.py
"""
import torch
import triton.testing

from common import environment

from kernels import window_attention as wa
from models.swin_transformer import relative_position_index, shifted_window_mask

# (name, window, windows per image, heads, head_dim): Swin-B / V2-B stages at window 12 and 16
CASES = [('w12 stage 1 (48x48 tokens, 4 heads)', 12, 16, 4, 32),
         ('w12 stage 3 (12x12 tokens, 16 heads)', 12, 1, 16, 32),
         ('w16 stage 1 (64x64 tokens, 4 heads)', 16, 16, 4, 32)]


def _time(window, nw, heads, d, v2, tile_above, batch=128):
    """(forward ms, forward + backward ms) of the launchers with keys tiled above `tile_above` tokens."""
    launch = dict(key_tile_above=tile_above)
    N = window * window
    qkv = torch.randn(batch * nw, N, 3 * heads * d, device='cuda', dtype=torch.bfloat16)
    table = torch.randn((2 * window - 1) ** 2, heads, device='cuda')
    index = relative_position_index(window).cuda()
    side = int(nw ** 0.5) * window
    mask = shifted_window_mask(side, side, window, window // 2).cuda() if nw > 1 else None
    tau = torch.full((heads,), 10.0, device='cuda') if v2 else None
    scale = 1.0 if v2 else d ** -0.5
    dout = torch.randn(batch * nw, N, heads * d, device='cuda', dtype=torch.bfloat16)

    def fwd():
        return wa.window_attention_fwd(qkv, table, index, mask, heads, scale, tau, norm_qk=v2, launch=launch)

    def step():
        out, lse, bm = fwd()
        wa.window_attention_bwd(dout, qkv, bm, index, out, lse, heads, scale, table.shape[0], tau, norm_qk=v2,
                                launch=launch)
    return triton.testing.do_bench(fwd), triton.testing.do_bench(step)


def main():
    print(environment())
    print('| case | model | one tile fwd / fwd+bwd ms | blocks of 64 fwd / fwd+bwd ms | faster |')
    print('|---|---|---|---|---|')
    for name, window, nw, heads, d in CASES:
        for v2 in (False, True):
            one = _time(window, nw, heads, d, v2, 1024)
            blocks = _time(window, nw, heads, d, v2, 0)
            best = 'blocks of 64' if blocks[1] < one[1] else 'one tile'
            print(f'| {name} | {"V2" if v2 else "V1"} | {one[0]:.3f} / {one[1]:.3f} | '
                  f'{blocks[0]:.3f} / {blocks[1]:.3f} | {best} |', flush=True)


if __name__ == '__main__':
    main()
