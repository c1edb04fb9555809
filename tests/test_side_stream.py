"""``turbox_mm.utils.side_stream``: a region on a side CUDA stream, ordered after its inputs,
before the main stream's use of its output; a plain call on the CPU."""
import pytest
import torch

from turbox_mm.utils.side_stream import mark_ready, run_on_side_stream, side_stream

# About 50 ms of a device's clock: long enough that an unordered read would see the old
# memory, short enough for a test.
SLEEP_CYCLES = 100_000_000


def test_on_the_cpu_the_region_is_a_plain_call():
    x = torch.arange(4.0)
    assert mark_ready([x]) is None
    assert mark_ready([]) is None
    assert mark_ready([3, x]) is None
    out = run_on_side_stream(lambda t, k: t * k, (x, 2), None)
    assert torch.equal(out, x * 2)


@pytest.mark.cuda
def test_the_region_runs_on_the_side_stream_and_the_main_stream_waits_for_it():
    main = torch.cuda.current_stream()
    x = torch.arange(1 << 20, device='cuda', dtype=torch.float32)
    ready = mark_ready([x])
    seen = []

    def region(t, scale):
        seen.append(torch.cuda.current_stream())
        torch.cuda._sleep(SLEEP_CYCLES)  # the result comes late on the side stream
        return t * scale

    out = run_on_side_stream(region, (x, 3.0), ready)
    assert seen == [side_stream(x.device)] and seen[0] != main
    assert torch.cuda.current_stream() == main
    y = out + 1  # queued on the main stream: must wait for the region on the device
    torch.cuda.synchronize()
    assert torch.equal(y, x * 3 + 1)


@pytest.mark.cuda
def test_the_region_waits_for_its_inputs_only():
    """Made on the main stream before ``mark_ready``, the input is complete when the region
    reads it; work queued on the main stream after the mark does not hold the region back."""
    x = torch.zeros(1 << 20, device='cuda')
    torch.cuda._sleep(SLEEP_CYCLES)
    x.add_(5)  # late on the main stream, before the mark
    ready = mark_ready([x])
    torch.cuda._sleep(20 * SLEEP_CYCLES)  # ~1 s queued after the mark
    done = torch.cuda.Event()

    def region(t):
        out = t * 2
        done.record()
        return out

    out = run_on_side_stream(region, (x, ), ready)
    done.synchronize()  # the region finishes while the main stream still sleeps
    assert not torch.cuda.current_stream().query()
    assert torch.equal(out, torch.full_like(x, 10.0))
    torch.cuda.synchronize()


class _LateBackward(torch.autograd.Function):
    """Identity whose backward finishes its gradient late, on the stream it runs on."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        torch.cuda._sleep(SLEEP_CYCLES)
        return grad * 1.0


@pytest.mark.cuda
def test_autograd_through_the_region_matches_the_main_stream():
    """Backward through a region whose backward runs late on the side stream: the gradients
    read on the main stream right after ``backward`` (no host synchronisation) are complete."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 64).cuda()
    x = torch.randn(512, 64, device='cuda', requires_grad=True)
    want = layer(x).square().sum()
    want_grads = torch.autograd.grad(want, [x, layer.weight])
    y = x * 1  # made on the main stream
    out = run_on_side_stream(lambda t: layer(_LateBackward.apply(t)), (y, ), mark_ready([y]))
    got = out.square().sum()
    got.backward()
    got_grads = [x.grad * 1.0, layer.weight.grad * 1.0]  # main-stream reads, no sync
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.cuda
def test_the_main_stream_waits_also_when_the_region_raises():
    x = torch.zeros(1 << 20, device='cuda')
    holder = []

    def failing(t):
        torch.cuda._sleep(SLEEP_CYCLES)
        holder.append(t + 7)  # finished late on the side stream
        raise ValueError('no points')

    with pytest.raises(ValueError, match='no points'):
        run_on_side_stream(failing, (x, ), mark_ready([x]))
    y = holder[0] * 1  # main stream
    torch.cuda.synchronize()
    assert torch.equal(y, torch.full_like(x, 7.0))


@pytest.mark.cuda
def test_a_region_that_returns_no_tensor_is_named():
    x = torch.ones(3, device='cuda')

    def pair(t):
        return t, t

    with pytest.raises(TypeError, match='pair.* returned tuple, not a tensor'):
        run_on_side_stream(pair, (x, ), mark_ready([x]))
