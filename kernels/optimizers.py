"""Fused AdamW and LAMB: every parameter updated in three launches, no host sync, one pass over
the optimizer state. `--fused_adam` / `--optim fused_adam|fused_lamb`.

Math (per element; g = the gradient as stored, s = the loss scale, c = the clip coefficient):
  sumsq  = sum over every gradient of g^2 (fp32)                          -- launch 1
  norm   = sqrt(sumsq) / s                    (what clip_grad_norm_ returns and we log)
  c      = min(1, clip / (norm + 1e-6))       (torch.nn.utils.clip_grad_norm_)
  finite = sumsq is finite; if not, nothing is written and the step count does not advance
           (GradScaler's skip; the scale update reads the same flag, on the device)
  AdamW (torch.optim.AdamW, decoupled decay):                               -- launch 3
    g' = g * c / s;  p *= 1 - lr*wd;  m += (1 - b1)(g' - m);  v = b2 v + (1 - b2) g'^2
    p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
  LAMB (timm's Lamb, apex's FusedLAMB math): g' = g * c / s / max(1, c*norm / max_grad_norm);
    m, v as above with m's weight (1 - b1); u = (m / (1 - b1^t)) / (sqrt(v)/sqrt(1 - b2^t) + eps) + wd p
    r = |p| / |u| per tensor (1 if either is 0; only where wd != 0)        -- launches 3 and 4
    p -= lr * r * u
Divisions and square roots are IEEE-rounded (tl.div_rn, tl.sqrt_rn), as torch's are: Triton's
plain `/` is an approximate division on the GPU, which moved weights by 4e-6 relative in 20 steps.
Launch 2 is one tiny program that turns sumsq, the loss scale, the step counts and the group
hyper-parameters into per-tensor scalars; bias corrections use b^t kept in fp64 on the device
(multiplied by b at each taken step), so they match torch's double-precision `b ** t`.

Layout: parameters, gradients and moments stay separate tensors; each launch gets tables of their
addresses (int64) and walks fixed-size chunks of every tensor, one program per chunk. Under O2 the
optimizer's parameters are the fp32 masters, the gradients are read straight from the half model
(no fp32 copy, no master .grad at all) and the new weights are written into the half model in the
same pass. The state dict is torch.optim.AdamW's (per-parameter 'step', 'exp_avg', 'exp_avg_sq')
or timm Lamb's (per-group 'step'): checkpoints move freely between --optim adamw and fused_adam.

The reference (`backend='torch'`) runs the same pipeline with torch ops; tests compare both with
torch.optim.AdamW and timm.optim.Lamb. apex (KERNEL_BACKEND apex): apex.optimizers.FusedAdam /
FusedLAMB through `build_apex_optimizer`.
"""
from typing import Dict, List, Optional, Sequence

import torch

from ._utils import apex_available, check_triton_device, next_power_of_2, triton_available

APEX_MODULE = 'apex.optimizers'
CHUNK = 16384          # elements per program: ~1.7k programs for Swin-T, enough to fill any GPU
BLOCK = 1024           # elements per inner iteration (4 warps x 8 per thread)


# ----------------------------------------------------------------------------- triton kernels
if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _chunk(pid, chunk_tensor_ptr, chunk_index_ptr, numel_ptr, CHUNK: tl.constexpr):
        """-> (tensor index, first element, numel) of program `pid`'s chunk."""
        t = tl.load(chunk_tensor_ptr + pid)
        start = tl.load(chunk_index_ptr + pid).to(tl.int64) * CHUNK
        n = tl.load(numel_ptr + t)
        return t, start, n

    @triton.jit
    def _state_ptrs(t, param_ptrs, exp_avg_ptrs, exp_avg_sq_ptrs, scalar_ptr, PARAM_DTYPE: tl.constexpr):
        """Tensor t's parameter, exp_avg and exp_avg_sq pointers, and its four prepared scalars."""
        p_ptr = tl.load(param_ptrs + t).to(tl.pointer_type(PARAM_DTYPE))
        m_ptr = tl.load(exp_avg_ptrs + t).to(tl.pointer_type(PARAM_DTYPE))
        v_ptr = tl.load(exp_avg_sq_ptrs + t).to(tl.pointer_type(PARAM_DTYPE))
        row = scalar_ptr + t * 4
        return p_ptr, m_ptr, v_ptr, tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3)

    @triton.jit
    def _grad_sumsq_kernel(grad_ptrs, numel_ptr, chunk_tensor_ptr, chunk_index_ptr, partial_ptr,
                           GRAD_DTYPE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
        """partial[pid] = sum of g^2 over this program's chunk (fp32)."""
        pid = tl.program_id(0)
        t, start, n = _chunk(pid, chunk_tensor_ptr, chunk_index_ptr, numel_ptr, CHUNK)
        g_ptr = tl.load(grad_ptrs + t).to(tl.pointer_type(GRAD_DTYPE))
        acc = tl.zeros([BLOCK], tl.float32)
        for i in range(0, tl.minimum(CHUNK, n - start), BLOCK):
            offs = start + i + tl.arange(0, BLOCK)
            g = tl.load(g_ptr + offs, mask=offs < n, other=0.).to(tl.float32)
            acc += g * g
        tl.store(partial_ptr + pid, tl.sum(acc, axis=0))

    @triton.jit
    def _prepare_kernel(partial_ptr, n_partials, inv_scale_ptr, hparam_ptr, group_ptr, global_ptr,
                        steps_ptr, pow_ptr, scalar_ptr, out_ptr, n_tensors, clip, max_grad_norm,
                        HAS_SCALE: tl.constexpr, LAMB: tl.constexpr, BLOCK: tl.constexpr):
        """One program. hparam [G, 4] fp64: lr, wd, b1, b2 of each group. Per live tensor l
        (global index global[l]): advance step and b^t when finite, then write scalar[l, :4]:
          AdamW: lr / (1 - b1^t), sqrt(1 - b2^t), 1 - lr*wd, 0
          LAMB:  1 - b1^t,        sqrt(1 - b2^t), wd,        lr
        out[0] = grad multiplier (NaN when not finite), out[1] = grad norm, out[2] = found_inf."""
        acc = tl.zeros([BLOCK], tl.float32)
        for i in range(0, n_partials, BLOCK):
            offs = i + tl.arange(0, BLOCK)
            acc += tl.load(partial_ptr + offs, mask=offs < n_partials, other=0.)
        sumsq = tl.sum(acc, axis=0)
        inv_scale = 1.
        if HAS_SCALE:
            inv_scale = tl.div_rn(1., tl.load(inv_scale_ptr))
        norm = tl.sqrt_rn(sumsq) * inv_scale
        coef = tl.where(clip > 0, tl.minimum(tl.div_rn(clip, norm + 1e-6), 1.), 1.)
        if LAMB:
            coef = tl.where(max_grad_norm > 0, tl.div_rn(coef, tl.maximum(tl.div_rn(norm * coef, max_grad_norm), 1.)), coef)
        finite = (sumsq - sumsq) == 0          # false for inf and nan
        mult = tl.where(finite, coef * inv_scale, sumsq - sumsq)   # NaN marks a skipped step
        tl.store(out_ptr, mult)
        tl.store(out_ptr + 1, norm)
        tl.store(out_ptr + 2, tl.where(finite, 0., 1.))
        for i in range(0, n_tensors, BLOCK):
            offs = i + tl.arange(0, BLOCK)
            ok = offs < n_tensors
            gi = tl.load(global_ptr + offs, mask=ok, other=0)
            grp = tl.load(group_ptr + offs, mask=ok, other=0)
            lr = tl.load(hparam_ptr + grp * 4, mask=ok, other=0.)
            wd = tl.load(hparam_ptr + grp * 4 + 1, mask=ok, other=0.)
            b1 = tl.load(hparam_ptr + grp * 4 + 2, mask=ok, other=0.)
            b2 = tl.load(hparam_ptr + grp * 4 + 3, mask=ok, other=0.)
            pow1 = tl.load(pow_ptr + gi * 2, mask=ok, other=1.)
            pow2 = tl.load(pow_ptr + gi * 2 + 1, mask=ok, other=1.)
            if finite:
                pow1 = pow1 * b1
                pow2 = pow2 * b2
                tl.store(pow_ptr + gi * 2, pow1, mask=ok)
                tl.store(pow_ptr + gi * 2 + 1, pow2, mask=ok)
                step = tl.load(steps_ptr + gi, mask=ok, other=0.)
                tl.store(steps_ptr + gi, step + 1., mask=ok)
            bc1 = 1. - pow1                      # fp64
            bc2_sqrt = tl.sqrt_rn((1. - pow2).to(tl.float32))
            if LAMB:
                s0 = bc1.to(tl.float32)
                s2 = wd.to(tl.float32)
                s3 = lr.to(tl.float32)
            else:
                s0 = (lr / bc1).to(tl.float32)
                s2 = (1. - lr * wd).to(tl.float32)
                s3 = tl.zeros([BLOCK], tl.float32)
            tl.store(scalar_ptr + offs * 4, s0, mask=ok)
            tl.store(scalar_ptr + offs * 4 + 1, bc2_sqrt, mask=ok)
            tl.store(scalar_ptr + offs * 4 + 2, s2, mask=ok)
            tl.store(scalar_ptr + offs * 4 + 3, s3, mask=ok)

    @triton.jit
    def _moments(g_ptr, m_ptr, v_ptr, offs, mask, mult, one_minus_beta1, beta2, one_minus_beta2,
                 PARAM_DTYPE: tl.constexpr):
        """m, v after this step (fp32), written back. 1 - b1 and 1 - b2 come from the
        host, computed in double as torch does: 1 - fp32(0.999) is 1.3e-5 away from fp32(0.001)."""
        g = tl.load(g_ptr + offs, mask=mask, other=0.).to(tl.float32) * mult
        m = tl.load(m_ptr + offs, mask=mask, other=0.).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask, other=0.).to(tl.float32)
        m = m + one_minus_beta1 * (g - m)       # lerp(m, g, 1 - b1), torch's form for weight < 0.5
        v = v * beta2 + one_minus_beta2 * g * g
        tl.store(m_ptr + offs, m.to(PARAM_DTYPE), mask=mask)
        tl.store(v_ptr + offs, v.to(PARAM_DTYPE), mask=mask)
        return m, v

    @triton.jit
    def _adamw_kernel(param_ptrs, grad_ptrs, exp_avg_ptrs, exp_avg_sq_ptrs, out_ptrs, numel_ptr,
                      chunk_tensor_ptr, chunk_index_ptr, scalar_ptr, mult_ptr, one_minus_beta1, beta2,
                      one_minus_beta2, eps,
                      PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr,
                      HAS_OUT: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        mult = tl.load(mult_ptr)
        if (mult - mult) == 0:                  # finite: take the step
            t, start, n = _chunk(pid, chunk_tensor_ptr, chunk_index_ptr, numel_ptr, CHUNK)
            p_ptr, m_ptr, v_ptr, step_size, bc2_sqrt, decay, _ = _state_ptrs(
                t, param_ptrs, exp_avg_ptrs, exp_avg_sq_ptrs, scalar_ptr, PARAM_DTYPE)
            g_ptr = tl.load(grad_ptrs + t).to(tl.pointer_type(GRAD_DTYPE))
            o_ptr = tl.load(out_ptrs + t).to(tl.pointer_type(OUT_DTYPE))
            for i in range(0, tl.minimum(CHUNK, n - start), BLOCK):
                offs = start + i + tl.arange(0, BLOCK)
                mask = offs < n
                m, v = _moments(g_ptr, m_ptr, v_ptr, offs, mask, mult, one_minus_beta1, beta2, one_minus_beta2,
                                PARAM_DTYPE)
                p = tl.load(p_ptr + offs, mask=mask, other=0.).to(tl.float32) * decay
                p = p - step_size * tl.div_rn(m, tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps)
                tl.store(p_ptr + offs, p.to(PARAM_DTYPE), mask=mask)
                if HAS_OUT:     # O2: the half model's weight, in the same pass
                    tl.store(o_ptr + offs, p.to(OUT_DTYPE), mask=mask)

    @triton.jit
    def _lamb_update(m, v, p, bc1, bc2_sqrt, wd, eps):
        return tl.div_rn(tl.div_rn(m, bc1), tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps) + wd * p

    @triton.jit
    def _lamb_norms_kernel(param_ptrs, grad_ptrs, exp_avg_ptrs, exp_avg_sq_ptrs, numel_ptr,
                           chunk_tensor_ptr, chunk_index_ptr, scalar_ptr, mult_ptr, norm_part_ptr,
                           one_minus_beta1, beta2, one_minus_beta2, eps, max_chunks,
                           PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr,
                           CHUNK: tl.constexpr, BLOCK: tl.constexpr):
        """New moments, and this chunk's sums of p^2 and u^2 into norm_part[t, chunk, 0:2]."""
        pid = tl.program_id(0)
        mult = tl.load(mult_ptr)
        if (mult - mult) == 0:
            t, start, n = _chunk(pid, chunk_tensor_ptr, chunk_index_ptr, numel_ptr, CHUNK)
            p_ptr, m_ptr, v_ptr, bc1, bc2_sqrt, wd, _ = _state_ptrs(
                t, param_ptrs, exp_avg_ptrs, exp_avg_sq_ptrs, scalar_ptr, PARAM_DTYPE)
            g_ptr = tl.load(grad_ptrs + t).to(tl.pointer_type(GRAD_DTYPE))
            p_sq = tl.zeros([BLOCK], tl.float32)
            u_sq = tl.zeros([BLOCK], tl.float32)
            for i in range(0, tl.minimum(CHUNK, n - start), BLOCK):
                offs = start + i + tl.arange(0, BLOCK)
                mask = offs < n
                m, v = _moments(g_ptr, m_ptr, v_ptr, offs, mask, mult, one_minus_beta1, beta2, one_minus_beta2,
                                PARAM_DTYPE)
                p = tl.load(p_ptr + offs, mask=mask, other=0.).to(tl.float32)
                u = tl.where(mask, _lamb_update(m, v, p, bc1, bc2_sqrt, wd, eps), 0.)
                p_sq += p * p
                u_sq += u * u
            slot = (t.to(tl.int64) * max_chunks + start // CHUNK) * 2
            tl.store(norm_part_ptr + slot, tl.sum(p_sq, axis=0))
            tl.store(norm_part_ptr + slot + 1, tl.sum(u_sq, axis=0))

    @triton.jit
    def _lamb_apply_kernel(param_ptrs, exp_avg_ptrs, exp_avg_sq_ptrs, out_ptrs, numel_ptr,
                           chunk_tensor_ptr, chunk_index_ptr, scalar_ptr, mult_ptr, norm_part_ptr,
                           eps, max_chunks,
                           PARAM_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr, HAS_OUT: tl.constexpr,
                           CHUNK: tl.constexpr, BLOCK: tl.constexpr, MAX_CHUNKS: tl.constexpr):
        """Recompute u from the new moments (cheaper than storing it), scale by the tensor's trust
        ratio (every program of a tensor sums the same fixed partials: deterministic) and apply."""
        pid = tl.program_id(0)
        mult = tl.load(mult_ptr)
        if (mult - mult) == 0:
            t, start, n = _chunk(pid, chunk_tensor_ptr, chunk_index_ptr, numel_ptr, CHUNK)
            p_ptr, m_ptr, v_ptr, bc1, bc2_sqrt, wd, lr = _state_ptrs(
                t, param_ptrs, exp_avg_ptrs, exp_avg_sq_ptrs, scalar_ptr, PARAM_DTYPE)
            c = tl.arange(0, MAX_CHUNKS)
            part = norm_part_ptr + (t.to(tl.int64) * max_chunks + c) * 2
            w_norm = tl.sqrt_rn(tl.sum(tl.load(part, mask=c < max_chunks, other=0.), axis=0))
            u_norm = tl.sqrt_rn(tl.sum(tl.load(part + 1, mask=c < max_chunks, other=0.), axis=0))
            ratio = tl.where((w_norm > 0) & (u_norm > 0), tl.div_rn(w_norm, u_norm), 1.)
            ratio = tl.where(wd != 0, ratio, 1.)
            o_ptr = tl.load(out_ptrs + t).to(tl.pointer_type(OUT_DTYPE))
            for i in range(0, tl.minimum(CHUNK, n - start), BLOCK):
                offs = start + i + tl.arange(0, BLOCK)
                mask = offs < n
                m = tl.load(m_ptr + offs, mask=mask, other=0.).to(tl.float32)
                v = tl.load(v_ptr + offs, mask=mask, other=0.).to(tl.float32)
                p = tl.load(p_ptr + offs, mask=mask, other=0.).to(tl.float32)
                u = _lamb_update(m, v, p, bc1, bc2_sqrt, wd, eps) * ratio
                p = p + (-lr) * u
                tl.store(p_ptr + offs, p.to(PARAM_DTYPE), mask=mask)
                if HAS_OUT:
                    tl.store(o_ptr + offs, p.to(OUT_DTYPE), mask=mask)

    _TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


# ----------------------------------------------------------------------------- the optimizers
def _addresses(tensors: Sequence[torch.Tensor], device) -> torch.Tensor:
    """int64 table of data pointers, copied to the device without a host sync."""
    table = torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64,
                         pin_memory=device.type == 'cuda')
    return table.to(device, non_blocking=True)


class _Launch:
    """Everything that stays fixed while the set of parameters with a gradient does not change:
    address tables of parameters, moments and half outputs, numels and the chunk map, per bucket
    of one (parameter, gradient, output) dtype triple."""

    def __init__(self, opt: '_FusedOptimizer', live: List[int], grads: List[torch.Tensor],
                 outs: Optional[List[torch.Tensor]], key: tuple):
        params = opt._params
        dev = opt._device
        self.key = key
        self.grad_key, self.grad_tables = None, None     # the gradients' address tables, rebuilt when they move
        self.n = len(live)
        buckets: Dict[tuple, List[int]] = {}
        for pos, i in enumerate(live):
            dtypes = (params[i].dtype, grads[pos].dtype, outs[pos].dtype if outs else None)
            buckets.setdefault(dtypes, []).append(pos)
        self.buckets = []
        n_chunks_total = 0
        n_rows = 0          # rows of the [live, 4] scalar table, in bucket order
        for (p_dtype, g_dtype, o_dtype), positions in buckets.items():
            ps = [params[live[pos]] for pos in positions]
            numels = [p.numel() for p in ps]
            chunks = [(k, c) for k, n in enumerate(numels) for c in range(max(1, -(-n // CHUNK)))]
            state = [opt.state[p] for p in ps]
            b = dict(
                positions=positions, p_dtype=p_dtype, g_dtype=g_dtype, o_dtype=o_dtype,
                params=_addresses(ps, dev),
                exp_avg=_addresses([s['exp_avg'] for s in state], dev),
                exp_avg_sq=_addresses([s['exp_avg_sq'] for s in state], dev),
                outs=_addresses([outs[pos] for pos in positions], dev) if outs else None,
                numel=torch.tensor(numels, dtype=torch.int64, device=dev),
                chunk_tensor=torch.tensor([k for k, _ in chunks], dtype=torch.int32, device=dev),
                chunk_index=torch.tensor([c for _, c in chunks], dtype=torch.int32, device=dev),
                n_chunks=len(chunks), partial_offset=n_chunks_total,
                max_chunks=max(c for _, c in chunks) + 1,
                scalar_offset=n_rows)   # the first of this bucket's rows in the scalar table
            if opt.LAMB:
                # per (tensor, chunk) sums of p^2 and u^2; slots past a tensor's last chunk are never
                # written and must read as 0, so zeroed once here, not every step
                b['lamb_parts'] = torch.zeros(len(positions) * b['max_chunks'] * 2, dtype=torch.float32,
                                              device=dev)
            n_chunks_total += len(chunks)
            n_rows += len(positions)
            self.buckets.append(b)
        # scalar rows follow bucket order: remap the prepare kernel's inputs accordingly
        order = [pos for b in self.buckets for pos in b['positions']]
        self.global_index = torch.tensor([live[pos] for pos in order], dtype=torch.int32, device=dev)
        self.group = torch.tensor([opt._group_of[live[pos]] for pos in order], dtype=torch.int32, device=dev)
        self.n_chunks = n_chunks_total
        self.partials = torch.empty(n_chunks_total, dtype=torch.float32, device=dev)
        self.scalars = torch.empty(self.n, 4, dtype=torch.float32, device=dev)


class _FusedOptimizer(torch.optim.Optimizer):
    """Shared machinery of FusedAdamW and FusedLAMB (see the module docstring)."""
    LAMB = False

    def __init__(self, params, defaults, backend: str = 'triton'):
        if backend not in ('triton', 'torch'):
            raise ValueError(f"backend {backend!r}: use 'triton' or 'torch' (apex: build_apex_optimizer)")
        super().__init__(params, defaults)
        self.backend = backend
        self._params = [p for g in self.param_groups for p in g['params']]
        self._group_of = [gi for gi, g in enumerate(self.param_groups) for _ in g['params']]
        devices = {p.device for p in self._params}
        if len(devices) != 1:
            raise ValueError(f'{type(self).__name__} needs every parameter on one device, got {devices}')
        self._device = devices.pop()
        if backend == 'triton':
            if not triton_available():
                raise RuntimeError(f'{type(self).__name__}: triton is not importable; use backend torch')
            check_triton_device(self._params[0])
        self._steps = None        # fp32 [P]: the step count of every parameter
        self._pows = None         # fp64 [P, 2]: b1^t, b2^t
        self._launch = None

    def add_param_group(self, param_group) -> None:
        if hasattr(self, '_params'):      # torch's __init__ adds the constructor's groups first
            raise RuntimeError(f'{type(self).__name__} takes all its parameter groups at construction; '
                               f'add_param_group afterwards is not supported')
        super().add_param_group(param_group)

    # ------------------------------------------------------------------ state
    def _init_state(self) -> None:
        """Moments for every parameter and the device step counts; once, and again after a load."""
        if self._steps is not None:
            return
        for p in self._params:
            st = self.state[p]
            if 'exp_avg' not in st:
                st['exp_avg'] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st['exp_avg_sq'] = torch.zeros_like(p, memory_format=torch.preserve_format)
        self._load_steps()

    def _step_of(self, i: int) -> float:
        raise NotImplementedError

    def _load_steps(self) -> None:
        steps = [self._step_of(i) for i in range(len(self._params))]
        betas = [self.param_groups[g]['betas'] for g in self._group_of]
        self._steps = torch.tensor(steps, dtype=torch.float32, device=self._device)
        self._pows = torch.tensor([[b1 ** s, b2 ** s] for s, (b1, b2) in zip(steps, betas)],
                                  dtype=torch.float64, device=self._device)

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        self._steps = None
        self._launch = None
        for p in self._params:   # moments must be contiguous for the kernels
            st = self.state.get(p, {})
            for k in ('exp_avg', 'exp_avg_sq'):
                if k in st:
                    st[k] = st[k].to(p.dtype).contiguous()

    def hparams_rows(self) -> torch.Tensor:
        """(lr, weight decay, beta1, beta2) of every group, float64, in (pinned) host memory."""
        return torch.tensor([[g['lr'], g['weight_decay'], g['betas'][0], g['betas'][1]] for g in self.param_groups],
                            dtype=torch.float64, pin_memory=self._device.type == 'cuda')

    def steps(self) -> List[float]:
        """The step count of every parameter (a host sync; for checkpoints and tests)."""
        if self._steps is None:
            return [self._step_of(i) for i in range(len(self._params))]
        return self._steps.tolist()

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        """Plain use (no loss scale, no clipping): the parameters' own gradients."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.fused_step(want_norm=False)
        return loss

    @torch.no_grad()
    def fused_step(self, clip_grad: Optional[float] = None, loss_scale: Optional[torch.Tensor] = None,
                   grads_from: Optional[Sequence[torch.Tensor]] = None,
                   write_to: Optional[Sequence[torch.Tensor]] = None, want_norm: bool = True,
                   hparams: Optional[torch.Tensor] = None):
        """One step with unscaling, clipping and the non-finite check folded in.

        clip_grad: clip the global grad norm to this (clip_grad_norm_), None/0 for no clipping.
        loss_scale: the loss scale (1-element fp32 tensor on the device) the gradients carry.
        grads_from: tensors, aligned with the optimizer's parameters, whose .grad to read (O2: the
            half model's parameters); default the parameters themselves.
        write_to: tensors aligned the same way that also receive the new weights (O2: the half
            model's parameters), cast to their dtype.
        want_norm: compute the grad norm even when neither clipping, a loss scale nor LAMB's
            max_grad_norm needs it (for the log). Without any of them the gradient pass is skipped
            (plain optimizer.step(): 28 bytes/parameter instead of 32, like torch's fused AdamW;
            the returned norm is then 0 and non-finite gradients are not checked, as in torch).
        hparams: a float64 [groups, 4] device tensor of (lr, weight decay, beta1, beta2) per group
            (see `hparams_rows`) that the caller keeps up to date; by default they are copied from the
            param groups at every call. A captured CUDA graph needs the former: a copy made during
            capture would replay the captured values forever.
        Returns (grad norm, found_inf) as device tensors: no host sync.
        """
        self._init_state()
        sources = grads_from if grads_from is not None else self._params
        live = [i for i, s in enumerate(sources) if s.grad is not None]
        if not live:
            return torch.zeros((), device=self._device), torch.zeros(1, device=self._device)
        grads = [sources[i].grad for i in live]
        for g in grads:      # (a sparse gradient raises here too)
            if not g.is_contiguous():
                raise RuntimeError(f'{type(self).__name__} needs dense contiguous gradients')
        outs = [write_to[i] for i in live] if write_to is not None else None
        groups = self.param_groups
        if hparams is None:
            hparams = self.hparams_rows().to(self._device, non_blocking=True)
        eps = groups[0]['eps']
        beta1, beta2 = groups[0]['betas']
        if any(g['eps'] != eps or tuple(g['betas']) != (beta1, beta2) for g in groups):
            raise ValueError(f'{type(self).__name__}: every parameter group must share betas and eps')
        max_grad_norm = (self.defaults.get('max_grad_norm') or 0.) if self.LAMB else 0.
        need_norm = bool(want_norm or clip_grad or loss_scale is not None or max_grad_norm)
        if self.backend == 'torch':
            return self._step_torch(live, grads, outs, hparams, clip_grad or 0., loss_scale, max_grad_norm,
                                    beta1, beta2, eps, need_norm)
        key = (tuple(live), tuple(self._params[i].data_ptr() for i in live),
               tuple(o.data_ptr() for o in outs) if outs else None)
        if self._launch is None or self._launch.key != key:
            self._launch = _Launch(self, live, grads, outs, key)
        return self._step_triton(self._launch, grads, hparams, clip_grad or 0., loss_scale, max_grad_norm,
                                 beta1, beta2, eps, need_norm)

    def _step_triton(self, L, grads, hparams, clip, loss_scale, max_grad_norm, beta1, beta2, eps, need_norm):
        check_triton_device(*grads)
        # [grad multiplier (NaN: skip), grad norm, found_inf]; fresh each step: callers keep the norm
        out = torch.empty(3, dtype=torch.float32, device=self._device)
        grad_key = tuple(g.data_ptr() for g in grads)
        if L.grad_key != grad_key:       # same gradient tensors as last step: reuse their address tables
            L.grad_tables = [_addresses([grads[pos] for pos in b['positions']], self._device) for b in L.buckets]
            L.grad_key = grad_key
        grad_tables = L.grad_tables
        for b, gp in zip(L.buckets, grad_tables):
            if need_norm:
                _grad_sumsq_kernel[(b['n_chunks'],)](
                    gp, b['numel'], b['chunk_tensor'], b['chunk_index'], L.partials[b['partial_offset']:],
                    GRAD_DTYPE=_TL_DTYPES[b['g_dtype']], CHUNK=CHUNK, BLOCK=BLOCK)
        scale = loss_scale if loss_scale is not None else out
        _prepare_kernel[(1,)](
            L.partials, L.n_chunks if need_norm else 0, scale, hparams, L.group, L.global_index, self._steps, self._pows,
            L.scalars, out, L.n, float(clip), float(max_grad_norm),
            HAS_SCALE=loss_scale is not None, LAMB=self.LAMB, BLOCK=256)
        for b, gp in zip(L.buckets, grad_tables):
            s = L.scalars[b['scalar_offset']:]
            has_out = b['outs'] is not None
            outs_t = b['outs'] if has_out else b['params']
            o_dtype = _TL_DTYPES[b['o_dtype']] if has_out else _TL_DTYPES[b['p_dtype']]
            grid = (b['n_chunks'],)
            common = dict(PARAM_DTYPE=_TL_DTYPES[b['p_dtype']], CHUNK=CHUNK, BLOCK=BLOCK)
            if not self.LAMB:
                _adamw_kernel[grid](b['params'], gp, b['exp_avg'], b['exp_avg_sq'], outs_t, b['numel'],
                                    b['chunk_tensor'], b['chunk_index'], s, out, 1 - beta1, beta2, 1 - beta2, eps,
                                    GRAD_DTYPE=_TL_DTYPES[b['g_dtype']], OUT_DTYPE=o_dtype,
                                    HAS_OUT=has_out, **common)
            else:
                parts = b['lamb_parts']
                _lamb_norms_kernel[grid](b['params'], gp, b['exp_avg'], b['exp_avg_sq'], b['numel'],
                                         b['chunk_tensor'], b['chunk_index'], s, out, parts,
                                         1 - beta1, beta2, 1 - beta2, eps, b['max_chunks'],
                                         GRAD_DTYPE=_TL_DTYPES[b['g_dtype']], **common)
                _lamb_apply_kernel[grid](b['params'], b['exp_avg'], b['exp_avg_sq'], outs_t, b['numel'],
                                         b['chunk_tensor'], b['chunk_index'], s, out, parts,
                                         eps, b['max_chunks'], OUT_DTYPE=o_dtype, HAS_OUT=has_out,
                                         MAX_CHUNKS=next_power_of_2(b['max_chunks']), **common)
        return out[1], out[2:3]

    # ------------------------------------------------------------------ reference
    def _step_torch(self, live, grads, outs, hparams, clip, loss_scale, max_grad_norm, beta1, beta2, eps,
                    need_norm):
        """The same pipeline in torch ops (the reference; the CPU path of --fused_adam)."""
        sumsq = torch.stack([g.float().pow(2).sum() for g in grads]).sum() if need_norm else \
            torch.zeros((), device=self._device)
        inv_scale = 1. / loss_scale.float().reshape(-1)[0] if loss_scale is not None else torch.ones((), device=self._device)
        norm = sumsq.sqrt() * inv_scale
        coef = torch.clamp(clip / (norm + 1e-6), max=1.) if clip > 0 else torch.ones_like(norm)
        if self.LAMB and max_grad_norm > 0:
            coef = coef / torch.clamp(norm * coef / max_grad_norm, min=1.)
        finite = torch.isfinite(sumsq)
        found_inf = (~finite).float().reshape(1)
        if not bool(finite):     # the reference may sync; the kernels do not
            return norm, found_inf
        mult = coef * inv_scale
        idx = torch.tensor(live, device=self._device)
        self._steps[idx] += 1
        self._pows[idx] *= torch.tensor([beta1, beta2], dtype=torch.float64, device=self._device)
        for pos, i in enumerate(live):
            p = self._params[i]
            st = self.state[p]
            lr, wd = hparams[self._group_of[i], 0], hparams[self._group_of[i], 1]
            pow1, pow2 = self._pows[i]
            bc1, bc2_sqrt = 1 - pow1, (1 - pow2).float().sqrt()
            g = grads[pos].float() * mult
            m = st['exp_avg'].float().lerp(g, 1 - beta1)
            v = st['exp_avg_sq'].float() * beta2 + (1 - beta2) * g * g
            pf = p.float()
            if not self.LAMB:
                pf = pf * (1 - lr * wd).float()
                pf = pf - (lr / bc1).float() * (m / (v.sqrt() / bc2_sqrt + eps))
            else:
                u = (m / bc1.float()) / (v.sqrt() / bc2_sqrt + eps) + wd.float() * pf
                if wd != 0:
                    w_norm, u_norm = pf.norm(), u.norm()
                    ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                    u = u * ratio
                pf = pf + (-lr.float()) * u
            st['exp_avg'].copy_(m)
            st['exp_avg_sq'].copy_(v)
            p.copy_(pf)
            if outs:
                outs[pos].copy_(pf)
        return norm, found_inf


class FusedAdamW(_FusedOptimizer):
    """torch.optim.AdamW's math (decoupled weight decay, no amsgrad), fused; same state dict."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, backend: str = 'triton'):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay), backend)

    def _step_of(self, i: int) -> float:
        st = self.state.get(self._params[i], {})
        return float(st['step']) if 'step' in st else 0.

    def state_dict(self):
        if self._steps is not None:
            for p, s in zip(self._params, self._steps.tolist()):
                if p in self.state:
                    self.state[p]['step'] = torch.tensor(s, dtype=torch.float32)
        return super().state_dict()


class FusedLAMB(_FusedOptimizer):
    """timm's Lamb (apex FusedLAMB's math: global grad-norm clip at max_grad_norm, bias correction,
    grad averaging, trust ratio where weight decay is not 0), fused; timm's state dict."""
    LAMB = True

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 1e-2, max_grad_norm: Optional[float] = 1.0, backend: str = 'triton'):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      max_grad_norm=max_grad_norm), backend)

    def _step_of(self, i: int) -> float:
        g = self.param_groups[self._group_of[i]]
        return float(g['step']) if 'step' in g else 0.

    def state_dict(self):
        if self._steps is not None:
            steps = self._steps.tolist()
            for gi, g in enumerate(self.param_groups):
                mine = [s for s, grp in zip(steps, self._group_of) if grp == gi]
                if mine:
                    g['step'] = torch.tensor(max(mine), dtype=torch.float32)
        return super().state_dict()


# ----------------------------------------------------------------------------- apex
def build_apex_optimizer(name: str, groups, lr: float, betas, eps: float, weight_decay: float):
    """apex.optimizers.FusedAdam (adam_w_mode) / FusedLAMB through apex's documented API."""
    if not apex_available(APEX_MODULE):
        raise RuntimeError(f'--optim {name} with KERNEL_BACKEND apex needs {APEX_MODULE}, which is not '
                           f'importable here: install NVIDIA apex with its CUDA extensions, or use '
                           f'KERNEL_BACKEND auto (our Triton optimizers)')
    import apex.optimizers as apex_optim
    if name == 'fused_adam':
        return apex_optim.FusedAdam(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                    adam_w_mode=True)
    return apex_optim.FusedLAMB(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                max_grad_norm=1.0)


def is_fused(optimizer) -> bool:
    return isinstance(optimizer, _FusedOptimizer)


__all__ = ['FusedAdamW', 'FusedLAMB', 'build_apex_optimizer', 'is_fused', 'CHUNK']
