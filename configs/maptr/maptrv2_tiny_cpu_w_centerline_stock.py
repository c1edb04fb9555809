# A tiny MapTR v2 with the centerline class, for CPU tests: the tiny v2 config
# (maptrv2_tiny_cpu_stock.py) with the changes that maptrv2_nusc_r50_24ep_w_centerline makes to
# the full one: a fourth map class, `centerline`, and more one-to-one vectors (8 here, 6 in
# the tiny v2; the decoded top-k, `bbox_coder.max_num`, stays 6, as the full config keeps 50
# for 70 vectors). The pipelines are repeated only because mmengine cannot change one entry
# of a list.
#
#     python tools/create_data.py synthetic --out data/nuscenes_tiny --scenes 3 --frames 3 \
#         --image-size 320x180 --points 1000 --sweeps 0 --val-scenes 1
#     python tools/create_data.py map-gt data/nuscenes_tiny/nuscenes_infos_train.pkl \
#         data/nuscenes_tiny/nuscenes_infos_val.pkl --data-root data/nuscenes_tiny \
#         --classes divider ped_crossing boundary centerline
#     NUSCENES_ROOT=data/nuscenes_tiny/ python tools/train.py \
#         configs/maptr/maptrv2_tiny_cpu_w_centerline_stock.py
_base_ = ['./maptrv2_tiny_cpu_stock.py']

data_root = '{{$NUSCENES_ROOT:data/nuscenes_tiny/}}'
grid_config = dict(x=[-30.0, -30.0, 0.15], y=[-15.0, -15.0, 0.15], z=[-10, 10, 20],
                   depth=[1.0, 35.0, 0.5])
map_classes = ['divider', 'ped_crossing', 'boundary', 'centerline']
num_map_classes = len(map_classes)
img_norm_cfg = dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)
aux_seg_cfg = dict(use_aux_seg=True, bev_seg=True, pv_seg=True, seg_classes=1,
                   feat_down_sample=32, pv_thickness=1)
bev_h_ = 20
bev_w_ = 10
num_vec = 8
num_pts = 10

model = dict(pts_bbox_head=dict(num_vec_one2one=num_vec, num_classes=num_map_classes,
                                bbox_coder=dict(num_classes=num_map_classes)))

map_gt = dict(type='turbox_mm.LoadMapGT', data_root=data_root, impl='precomputed',
              patch_size=(60.0, 30.0), map_classes=map_classes, fixed_num=num_pts,
              padding_value=-10000)
image_loader = dict(type='LoadMultiViewImageFromFiles', to_float32=True, num_views=6)
train_pipeline = [
    dict(type='turbox_mm.NuScenesMapTRAdaptor'),
    image_loader,
    dict(type='turbox_mm.RandomScaleImageMultiViewImage', scales=[0.5]),
    dict(type='turbox_mm.PhotoMetricDistortionMultiViewImage'),
    dict(type='turbox_mm.NormalizeMultiviewImage', **img_norm_cfg),
    dict(type='LoadPointsFromFile', coord_type='LIDAR', load_dim=5, use_dim=5),
    dict(type='turbox_mm.PointToMultiViewDepth', downsample=1, grid_config=grid_config),
    dict(type='turbox_mm.PadMultiViewImageDepth', size_divisor=32),
    dict(map_gt, drop_empty=True),
    dict(type='turbox_mm.RasterizeMapGT', bev_size=(bev_h_, bev_w_), patch_size=(60.0, 30.0),
         **aux_seg_cfg),
    dict(type='turbox_mm.PackMapTRInputs',
         keys=['img', 'gt_depth', 'gt_map_labels', 'gt_map_shifts', 'gt_map_bboxes',
               'gt_map_pts', 'gt_map_bev_seg', 'gt_map_pv_seg']),
]
test_pipeline = [
    dict(type='turbox_mm.NuScenesMapTRAdaptor'),
    image_loader,
    dict(type='turbox_mm.RandomScaleImageMultiViewImage', scales=[0.5]),
    dict(type='turbox_mm.NormalizeMultiviewImage', **img_norm_cfg),
    dict(type='turbox_mm.PadMultiViewImage', size_divisor=32),
    map_gt,
    dict(type='turbox_mm.PackMapTRInputs', keys=['img']),
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(classes=map_classes)
test_evaluator = val_evaluator
