# MapTR v2 with the centerline class: upstream's maptrv2_nusc_r50_24ep_w_centerline
# (hustvl/MapTR projects/configs/maptrv2/ @ 2bb012a). It differs from maptrv2_nusc_r50_24ep in
# three values only: a fourth map class, `centerline` (label 3: lanes and lane connectors
# joined through their connectivity, every root-to-leaf path, turbox_mm/datasets/map_gt/
# centerline_reference.py; its point sets keep their forward order only), and 70 one-to-one
# vectors (num_vec, also the decoder's) instead of 50. Everything else is the base config's;
# the pipelines are repeated below only because mmengine cannot change one entry of a list.
#
# Data: the map ground truth precomputed with the centerline class (an annotation of the four
# classes also serves the three-class configs):
#
#     python tools/create_data.py map-gt $NUSCENES_ROOT/nuscenes_infos_train.pkl \
#         $NUSCENES_ROOT/nuscenes_infos_val.pkl --data-root $NUSCENES_ROOT \
#         --classes divider ped_crossing boundary centerline --force
_base_ = ['./maptrv2_nusc_r50_24ep_stock.py']

data_root = '{{$NUSCENES_ROOT:data/nuscenes/}}'
point_cloud_range = [-15.0, -30.0, -10.0, 15.0, 30.0, 10.0]
patch_size = (point_cloud_range[4] - point_cloud_range[1],
              point_cloud_range[3] - point_cloud_range[0])
grid_config = dict(x=[-30.0, -30.0, 0.15], y=[-15.0, -15.0, 0.15], z=[-10, 10, 20],
                   depth=[1.0, 35.0, 0.5])
img_norm_cfg = dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)
map_classes = ['divider', 'ped_crossing', 'boundary', 'centerline']
num_vec = 70
num_map_classes = len(map_classes)
fixed_ptsnum_per_gt_line = 20
bev_h_ = 200
bev_w_ = 100
aux_seg_cfg = dict(use_aux_seg=True, bev_seg=True, pv_seg=True, seg_classes=1,
                   feat_down_sample=32, pv_thickness=1)

model = dict(pts_bbox_head=dict(num_vec_one2one=num_vec, num_classes=num_map_classes,
                                bbox_coder=dict(num_classes=num_map_classes)))

map_gt = dict(type='turbox_mm.LoadMapGT', data_root=data_root, impl='precomputed',
              patch_size=patch_size, map_classes=map_classes,
              fixed_num=fixed_ptsnum_per_gt_line, padding_value=-10000)
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
    dict(type='turbox_mm.RasterizeMapGT', bev_size=(bev_h_, bev_w_), patch_size=patch_size,
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
