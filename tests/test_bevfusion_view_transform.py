"""BEVFusion's DepthLSSTransform: geometry, lidar depth images, stock vs turbox parity."""
import math

import pytest
import torch

from conftest import no_matrix_products

from turbox_mm.models.bevfusion import DepthLSSTransform, depth_image_batched, depth_image_stock
from turbox_mm.ops import dispatch

IMAGE, FEATURE = (64, 176), (8, 22)
SMALL = dict(in_channels=16, out_channels=8, image_size=IMAGE, feature_size=FEATURE,
             xbound=[-20.0, 20.0, 1.0], ybound=[-20.0, 20.0, 1.0], zbound=[-10.0, 10.0, 20.0],
             dbound=[1.0, 21.0, 2.0], downsample=2)


def rig(batch=2, cams=3, seed=0):
    """Cameras 120 degrees apart looking outwards, image augmentation (scale, crop, a small
    rotation), lidar augmentation (rotation, scale, translation): the BEVFusion matrices."""
    gen = torch.Generator().manual_seed(seed)
    height, width = IMAGE
    k = torch.tensor([[40.0, 0, width / 2], [0, 40.0, height / 2], [0, 0, 1]])
    cam2img = torch.eye(4).repeat(batch, cams, 1, 1)
    cam2img[..., :3, :3] = k
    cam2lidar = torch.eye(4).repeat(batch, cams, 1, 1)
    img_aug = torch.eye(4).repeat(batch, cams, 1, 1)
    lidar_aug = torch.eye(4).repeat(batch, 1, 1)
    for b in range(batch):
        yaw = float(torch.rand(1, generator=gen)) * 0.4
        scale = 0.95 + 0.1 * float(torch.rand(1, generator=gen))
        c, s = math.cos(yaw) * scale, math.sin(yaw) * scale
        lidar_aug[b, :3, :3] = torch.tensor([[c, -s, 0], [s, c, 0], [0, 0, scale]])
        lidar_aug[b, :3, 3] = torch.rand(3, generator=gen) - 0.5
        for n in range(cams):
            theta = n * 2 * math.pi / cams + 0.1 * b
            forward = torch.tensor([math.cos(theta), math.sin(theta), 0.0])
            right = torch.tensor([math.sin(theta), -math.cos(theta), 0.0])
            down = torch.tensor([0.0, 0.0, -1.0])
            cam2lidar[b, n, :3, :3] = torch.stack([right, down, forward], 1)
            cam2lidar[b, n, :3, 3] = torch.tensor([0.5, 0.0, 1.6])
            angle = (float(torch.rand(1, generator=gen)) - 0.5) * 0.1
            rot = torch.tensor([[math.cos(angle), math.sin(angle)],
                                [-math.sin(angle), math.cos(angle)]]) * 0.9
            img_aug[b, n, :2, :2] = rot
            img_aug[b, n, :2, 3] = torch.tensor([3.0, 2.0])
    lidar2image = cam2img @ torch.inverse(cam2lidar)
    return dict(lidar2image=lidar2image, cam_intrinsic=cam2img, camera2lidar=cam2lidar,
                img_aug_matrix=img_aug, lidar_aug_matrix=lidar_aug)


def clouds(batch=2, seed=0, sizes=(3000, 2200)):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for b in range(batch):
        pts = torch.randn(sizes[b], 5, generator=gen) * torch.tensor([12.0, 12.0, 1.0, 1, 1])
        out.append(pts)
    return out


def test_geometry_of_an_unaugmented_camera_is_the_pinhole_back_projection():
    vt = DepthLSSTransform(**SMALL)
    mats = rig(batch=1, cams=1)
    eye = torch.eye(4).view(1, 1, 4, 4)
    geom = vt.get_geometry(mats['camera2lidar'][..., :3, :3], mats['camera2lidar'][..., :3, 3],
                           mats['cam_intrinsic'][..., :3, :3], eye[..., :3, :3],
                           eye[..., :3, 3])
    assert geom.shape == (1, 1, 10, 8, 22, 3)
    u, v, d = vt.frustum[3, 5, 7]
    k = mats['cam_intrinsic'][0, 0, :3, :3]
    cam = torch.linalg.solve(k, torch.stack([u * d, v * d, d]))
    want = mats['camera2lidar'][0, 0, :3, :3] @ cam + mats['camera2lidar'][0, 0, :3, 3]
    torch.testing.assert_close(geom[0, 0, 3, 5, 7], want, rtol=1e-5, atol=1e-4)
    assert float(vt.frustum[..., 0].max()) == IMAGE[1] - 1 and float(vt.frustum[0, 0, 0, 2]) == 1


def assert_images_agree(got, want):
    """Batched depth images against the loop's: the batched path's float32 multiply-adds
    round in another order than the loop's matrix products, so depths agree within rounding,
    and a point within that rounding of a pixel edge may land on the next pixel (a handful
    of the images' pixels)."""
    assert got.shape == want.shape
    assert ((got > 0) == (want > 0)).float().mean() > 0.9999, 'hit pixels differ'
    both = (got > 0) & (want > 0)
    close = torch.isclose(got[both], want[both], rtol=1e-5, atol=0)
    assert close.float().mean() > 0.999, f'{int((~close).sum())} of {int(both.sum())} depths'


def test_batched_depth_images_equal_upstreams_loop():
    mats = rig()
    pts = clouds()
    pts[1][7:12] = pts[1][3]  # several points on one pixel: the last one wins in both
    args = (pts, mats['lidar2image'], mats['img_aug_matrix'], mats['lidar_aug_matrix'], IMAGE)
    want = depth_image_stock(*args)
    got = depth_image_batched(*args)
    assert got.shape == (2, 3, 1, *IMAGE)
    assert int((want > 0).sum()) > 1000
    assert_images_agree(got, want)


@pytest.mark.parametrize('spare_slots', [1, 8, 1 << 16])
def test_batched_depth_images_do_not_depend_on_the_spare_slots(monkeypatch, spare_slots):
    """Off-image entries are spread over the spare slots past the images (many entries a
    slot when there are few slots): the images stay those of upstream's loop."""
    from turbox_mm.models.bevfusion import lidar_depth
    monkeypatch.setattr(lidar_depth, 'SPARE_SLOTS', spare_slots)
    mats = rig()
    args = (clouds(seed=3), mats['lidar2image'], mats['img_aug_matrix'],
            mats['lidar_aug_matrix'], IMAGE)
    want = depth_image_stock(*args)
    got = depth_image_batched(*args)
    assert int((want > 0).sum()) > 1000
    assert_images_agree(got, want)


def test_turbox_geometry_and_depth_images_do_not_wait_for_the_device():
    """The turbox view transform's frustum points and lidar depth images have no operation
    that would make the host wait (``torch.inverse``'s singularity check was two of them);
    the values are the stock ones."""
    from turbox_mm.benchmark.sync_prone import SyncProneOps
    stock, turbox = _pair()
    mats = rig()
    args = (mats['camera2lidar'][..., :3, :3], mats['camera2lidar'][..., :3, 3],
            mats['cam_intrinsic'][..., :3, :3], mats['img_aug_matrix'][..., :3, :3],
            mats['img_aug_matrix'][..., :3, 3], mats['lidar_aug_matrix'][..., :3, :3],
            mats['lidar_aug_matrix'][..., :3, 3])
    draw = (clouds(), mats['lidar2image'], mats['img_aug_matrix'], mats['lidar_aug_matrix'])
    with SyncProneOps(backward_sources=False) as found:
        geom = turbox.get_geometry(*args)
        images = turbox.depth_image(*draw)
    assert found.total == 0, found.findings
    with SyncProneOps(backward_sources=False) as found_stock:
        stock.get_geometry(*args)
    assert found_stock.total > 0  # the finder sees the stock path's check
    # the turbox path rotates by multiply-adds, not matmul: the same sums, rounded in
    # another order (a few float32 ulps of the largest coordinate)
    reference = stock.get_geometry(*args)
    bound = 8 * torch.finfo(torch.float32).eps * float(reference.abs().max())
    assert float((geom - reference).abs().max()) <= bound
    with no_matrix_products():  # the multiply-adds ran, TF32 cannot round them
        turbox.get_geometry(*args)
        turbox.depth_image(*draw)
    assert_images_agree(images, stock.depth_image(*draw))


def _pair(seed=0):
    torch.manual_seed(seed)
    stock = DepthLSSTransform(**SMALL).eval()
    turbox = DepthLSSTransform(**SMALL, op_impl='turbox').eval()
    turbox.load_state_dict(stock.state_dict())
    return stock, turbox


@pytest.mark.parametrize('kernel', [False, True])
def test_stock_and_turbox_give_the_same_bev_and_gradients(kernel):
    stock, turbox = _pair()
    mats = rig()
    pts = clouds()
    img = torch.randn(2, 3, 16, *FEATURE, generator=torch.Generator().manual_seed(1))
    a, b = img.clone().requires_grad_(True), img.clone().requires_grad_(True)
    want = stock(a, pts, **mats)
    if kernel:
        with dispatch.kernel_on_cpu():
            got = turbox(b, pts, **mats)
            got.square().sum().backward()
    else:
        got = turbox(b, pts, **mats)
        got.square().sum().backward()
    want.square().sum().backward()
    assert got.shape == want.shape == (2, 8, 20, 20)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-4)
    for (name, p), q in zip(stock.named_parameters(), turbox.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-4, msg=name)


def test_the_pooling_alone_can_be_turboxs():
    vt = DepthLSSTransform(**SMALL, bev_pool_impl='turbox')
    assert vt.op_impl == 'stock' and vt.bev_pool_impl == 'turbox'
    assert not any('frustum' in k or k in ('dx', 'bx', 'nx') for k in vt.state_dict())


@pytest.mark.parametrize('change, match', [(dict(downsample=3), 'downsample must be 1 or 2'),
                                           (dict(op_impl='fast'), "op_impl must be 'stock'")])
def test_bad_arguments_are_named(change, match):
    with pytest.raises(ValueError, match=match):
        DepthLSSTransform(**dict(SMALL, **change))
