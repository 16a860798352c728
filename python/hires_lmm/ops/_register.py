"""Shared registration helpers for hires_lmm.ops: fake kernels and the autograd formula that
recomputes an op with its PyTorch reference (used until an op has a backward kernel)."""
import torch

_LIB = "hires_lmm"


def op(name: str):
    """torch.ops.hires_lmm.<name>"""
    return getattr(getattr(torch.ops, _LIB), name)


_OVERLOADS = {}


def overload(name: str):
    """torch.ops.hires_lmm.<name>.default, looked up once: the per-call getattr chain and the
    overload packet cost ~0.5 us, a tenth of a small op's call on the CPU (the ops' hot path).
    A plain dict, not functools.lru_cache: Dynamo warns on every traced call of a cached function."""
    f = _OVERLOADS.get(name)
    if f is None:
        f = _OVERLOADS[name] = op(name).default
    return f


def check_fake_devices(op_name: str, **tensors) -> None:
    """Fake kernels also run when a meta tensor is mixed with real ones; refuse mixed devices
    (naming the argument) instead of returning an uninitialised tensor."""
    first = None
    for name, t in tensors.items():
        if t is None:
            continue
        if first is None:
            first = (name, t.device)
        elif t.device != first[1]:
            raise RuntimeError(f"{op_name}: argument '{name}' is on {t.device} but '{first[0]}' is "
                               f"on {first[1]}; all tensors must be on one device")


def register_reference_backward(name: str, reference_fn) -> None:
    """Autograd for torch.ops.hires_lmm.<name>: backward re-runs `reference_fn` (same signature)
    under autograd and differentiates it. Gradients flow to every floating-point tensor input."""

    def setup_context(ctx, inputs, output):
        ctx.tensor_pos = [i for i, a in enumerate(inputs) if isinstance(a, torch.Tensor)]
        ctx.others = [None if isinstance(a, torch.Tensor) else a for a in inputs]
        ctx.save_for_backward(*[inputs[i] for i in ctx.tensor_pos])

    def backward(ctx, *grads):
        args = list(ctx.others)
        for i, t in zip(ctx.tensor_pos, ctx.saved_tensors):
            args[i] = t
        diff = [i for i in ctx.tensor_pos
                if ctx.needs_input_grad[i] and args[i].is_floating_point()]
        result = [None] * len(args)
        if not diff:
            return tuple(result)
        with torch.enable_grad():
            leaves = {i: args[i].detach().requires_grad_(True) for i in diff}
            for i, leaf in leaves.items():
                args[i] = leaf
            outs = reference_fn(*args)
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        pairs = [(o, g) for o, g in zip(outs, grads)
                 if g is not None and isinstance(o, torch.Tensor) and o.requires_grad]
        if pairs:
            got = torch.autograd.grad([o for o, _ in pairs], [leaves[i] for i in diff],
                                      [g for _, g in pairs], allow_unused=True)
        else:
            got = [None] * len(diff)
        for i, g in zip(diff, got):
            result[i] = g if g is not None else torch.zeros_like(leaves[i])
        return tuple(result)

    torch.library.register_autograd(f"{_LIB}::{name}", backward, setup_context=setup_context)
