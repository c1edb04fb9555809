# A tiny MapTR v2 for CPU tests and the no-GPU demo: ResNet-18 (no pretrained weights) on
# 320x180 images (scaled by 0.5 and padded as upstream: 160x96, 3x5 features), 32 channels,
# the LSS encoder on a 1.5 m grid (40x20 cells, 20x10 after its stride) over the same
# 30 m x 60 m with upstream's 68 depth bins, 6 one-to-one + 12 one-to-many vectors x 10
# points, 2 decoder layers, batch 2, fp32, 8 iterations at a constant learning rate, Chamfer
# mAP on the synthetic val split. Everything else (pipeline with depth targets and
# segmentation masks, GridMask, losses, assignment, decoding, metric) is the stock config's.
#
#     python tools/create_data.py synthetic --out data/nuscenes_tiny --scenes 3 --frames 3 \
#         --image-size 320x180 --points 1000 --sweeps 0 --val-scenes 1
#     python tools/create_data.py map-gt data/nuscenes_tiny/nuscenes_infos_train.pkl \
#         data/nuscenes_tiny/nuscenes_infos_val.pkl --data-root data/nuscenes_tiny
#     NUSCENES_ROOT=data/nuscenes_tiny/ python tools/train.py \
#         configs/maptr/maptrv2_tiny_cpu_stock.py
_base_ = ['./maptrv2_nusc_r50_24ep_stock.py']

data_root = '{{$NUSCENES_ROOT:data/nuscenes_tiny/}}'
point_cloud_range = [-15.0, -30.0, -10.0, 15.0, 30.0, 10.0]
voxel_size = [1.5, 1.5, 20.0]
grid_config = dict(x=[-30.0, -30.0, 0.15], y=[-15.0, -15.0, 0.15], z=[-10, 10, 20],
                   depth=[1.0, 35.0, 0.5])
map_classes = ['divider', 'ped_crossing', 'boundary']
img_norm_cfg = dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)
aux_seg_cfg = dict(use_aux_seg=True, bev_seg=True, pv_seg=True, seg_classes=1,
                   feat_down_sample=32, pv_thickness=1)
_dim_ = 32
bev_h_ = 20
bev_w_ = 10
num_vec = 6
num_pts = 10
batch_size = 2
max_iters = 8

model = dict(
    img_backbone=dict(depth=18, frozen_stages=-1, norm_cfg=dict(type='BN', requires_grad=True),
                      norm_eval=False, init_cfg=None),  # from scratch: no download
    img_neck=dict(in_channels=[512], out_channels=_dim_),
    bev_encoder=dict(in_channels=_dim_, out_channels=_dim_, voxel_size=voxel_size,
                     depthnet_cfg=dict(use_dcn=False, with_cp=False, aspp_mid_channels=16)),
    pts_bbox_head=dict(
        bev_h=bev_h_, bev_w=bev_w_, num_vec_one2one=num_vec, num_vec_one2many=12,
        k_one2many=2, num_pts_per_vec=num_pts, num_pts_per_gt_vec=num_pts,
        in_channels=_dim_, embed_dims=_dim_,
        decoder=dict(num_layers=2, layer_cfg=dict(
            self_attn_cfg=dict(embed_dims=_dim_, num_heads=4),
            cross_attn_cfg=dict(embed_dims=_dim_, num_heads=4),
            ffn_cfg=dict(embed_dims=_dim_, feedforward_channels=_dim_ * 2))),
        bbox_coder=dict(max_num=num_vec)))

# the map ground truth precomputed in the infos, as the full config (map-gt, above)
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
    # upstream's filter_empty_gt: a training sample without map elements is replaced by
    # another (mmengine's dataset re-draws when the pipeline returns None)
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
train_dataloader = dict(batch_size=batch_size, num_workers=0, persistent_workers=False,
                        dataset=dict(data_root=data_root, pipeline=train_pipeline))
val_dataloader = dict(num_workers=0, persistent_workers=False,
                      dataset=dict(data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader

train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=max_iters,
                 val_interval=max_iters)
optim_wrapper = dict(_delete_=True, type='OptimWrapper',
                     optimizer=dict(type='AdamW', lr=2e-3, weight_decay=0.01),
                     paramwise_cfg=dict(custom_keys={'img_backbone': dict(lr_mult=0.1)}),
                     clip_grad=dict(max_norm=35, norm_type=2))
param_scheduler = []
default_hooks = dict(logger=dict(interval=1),
                     checkpoint=dict(interval=max_iters, by_epoch=False))
log_processor = dict(window_size=1, by_epoch=False)
randomness = dict(seed=0)
