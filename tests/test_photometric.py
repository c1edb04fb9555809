"""turbox_mm.ops.photometric: the fused Triton kernel against its PyTorch reference.

On the CPU the kernel runs in Triton's interpreter (conftest sets ``TRITON_INTERPRET=1``) at
small sizes; the ``cuda`` test runs it compiled on a Sparse4D batch (36 images of 256x704).
The op has no gradients: it is a data transform on integer-valued images.
"""
import warnings

import pytest
import torch

from turbox_mm.ops import dispatch
from turbox_mm.ops import photometric as ph

pytest.importorskip('triton')
pytest.importorskip('turbox_mm.ops.photometric.triton_kernels')

MEAN = torch.tensor([123.675, 116.28, 103.53])
STD = torch.tensor([58.395, 57.12, 57.375])


def make_case(num=6, hw=(9, 13), seed=0, prob=0.5, dtype=torch.uint8):
    gen = torch.Generator().manual_seed(seed)
    imgs = torch.randint(0, 256, (num, 3, *hw), generator=gen, dtype=torch.uint8)
    imgs[0, :, 0, :3] = torch.tensor([[0, 255, 128], [0, 255, 128], [0, 255, 128]])  # greys
    imgs[1, :, 0, :3] = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255]])  # primaries
    params = ph.PhotometricParams.sample(num, gen, prob=prob)
    return imgs.to(dtype), params.packed()


def run_kernel(*args, **kwargs):
    with dispatch.kernel_on_cpu():
        return ph.photometric_normalize(*args, **kwargs)


@pytest.mark.parametrize('dtype', [torch.uint8, torch.float32])
@pytest.mark.parametrize('clip, reverse', [(False, False), (True, True), (False, True)])
@pytest.mark.parametrize('prob', [0.5, 1.0])
def test_kernel_matches_reference(dtype, clip, reverse, prob):
    imgs, params = make_case(seed=int(prob * 10) + clip, prob=prob, dtype=dtype)
    got = run_kernel(imgs, params, MEAN, STD, saturation_clip=clip, reverse_channels=reverse)
    want = ph.photometric_normalize_reference(imgs, params, MEAN, STD, clip, reverse)
    assert got.dtype == torch.float32 and got.shape == imgs.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert (got - ph.photometric_normalize_reference(imgs, params, MEAN, STD, clip, reverse,
                                                     augment=False)).abs().max() > 0.05


def test_without_distortion_equals_the_stock_normalisation_to_the_bit():
    imgs, params = make_case()
    got = run_kernel(imgs, params, MEAN, STD, reverse_channels=True, augment=False)
    want = (imgs[:, [2, 1, 0]].float() - MEAN.view(3, 1, 1)) / STD.view(3, 1, 1)
    assert torch.equal(got, want)


def test_identity_parameters_give_back_the_image():
    imgs, _ = make_case(prob=0.0)
    params = ph.PhotometricParams.sample(6, torch.Generator().manual_seed(1), prob=0.0)
    got = run_kernel(imgs, params.packed(), torch.zeros(3), torch.ones(3))
    torch.testing.assert_close(got, imgs.float(), rtol=0, atol=2e-4)  # the HSV round trip


def test_non_contiguous_and_empty():
    imgs, params = make_case(num=3)
    strided = imgs.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    assert not strided.is_contiguous()
    torch.testing.assert_close(run_kernel(strided, params, MEAN, STD),
                               run_kernel(imgs, params, MEAN, STD), rtol=0, atol=0)
    assert run_kernel(imgs[:0], params[:0], MEAN, STD).shape == (0, 3, 9, 13)
    assert run_kernel(imgs[:, :, :0], params, MEAN, STD).shape == (3, 3, 0, 13)


@pytest.mark.parametrize('imgs, params, match', [
    (torch.zeros(2, 4, 3, 3), torch.zeros(2, 8), 'imgs must be uint8 or float32'),
    (torch.zeros(2, 3, 3, 3, dtype=torch.float16), torch.zeros(2, 8), 'imgs must be'),
    (torch.zeros(2, 3, 3, 3), torch.zeros(3, 8), 'params must be float'),
    (torch.zeros(2, 3, 3, 3), torch.zeros(2, 7), 'params must be float'),
])
def test_bad_inputs_name_the_argument(imgs, params, match):
    with pytest.raises(ValueError, match=match):
        ph.photometric_normalize(imgs, params, MEAN, STD)
    with pytest.raises(ValueError, match='mean must have 3 values'):
        ph.photometric_normalize(torch.zeros(1, 3, 2, 2), torch.zeros(1, 8), MEAN[:2], STD)


def test_reference_on_cpu_warns_once(monkeypatch):
    monkeypatch.setattr(dispatch, '_warned', set())
    imgs, params = make_case(num=2)
    assert 'cpu' in ph.fallback_reason(imgs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        ph.photometric_normalize(imgs, params, MEAN, STD)
        ph.photometric_normalize(imgs, params, MEAN, STD)
    assert len([w for w in caught if 'photometric_normalize runs the PyTorch reference'
                in str(w.message)]) == 1


def test_opcheck_and_compile_without_graph_break():
    imgs, params = make_case(num=2)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        result = torch.library.opcheck(torch.ops.turbox_mm.photometric_normalize.default,
                                       (imgs, params, MEAN, STD, True, True, True))
        assert all(v == 'SUCCESS' for v in result.values()), result

        def fn(x, p):
            return ph.photometric_normalize(x, p, MEAN, STD, reverse_channels=True).sum()

        torch._dynamo.reset()
        compiled = torch.compile(fn, fullgraph=True, backend='aot_eager')
        torch.testing.assert_close(compiled(imgs, params), fn(imgs, params))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_kernel_matches_reference_on_a_sparse4d_batch():
    imgs, params = make_case(num=36, hw=(256, 704), seed=3, prob=0.5)
    imgs, params = imgs.cuda(), params.cuda()
    for clip in (False, True):
        got = ph.photometric_normalize(imgs, params, MEAN, STD, clip, True)
        want = ph.photometric_normalize_reference(imgs, params, MEAN.cuda(), STD.cuda(), clip,
                                                  True)
        err = (got - want).abs()
        assert err.max() < 1e-3 and err.mean() < 1e-5, (err.max(), err.mean())
    plain = ph.photometric_normalize(imgs, params, MEAN, STD, reverse_channels=True,
                                     augment=False)
    assert torch.equal(plain, (imgs[:, [2, 1, 0]].float() - MEAN.cuda().view(3, 1, 1))
                       / STD.cuda().view(3, 1, 1))
