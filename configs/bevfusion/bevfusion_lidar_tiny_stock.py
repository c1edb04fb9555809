# A tiny lidar-only BEVFusion for CPU tests and the no-GPU demo: 0.4 m voxels over +-25.6 m
# (a 128 x 128 x 41 grid, a 16 x 16 BEV; inside every class's nuScenes evaluation range),
# narrow encoder / backbone / head, 50 proposals, batch 2, 12 iterations at a constant
# learning rate. Everything else (pipeline with GT-paste and the BEVFusion flips, assignment,
# losses, decoding) is the full config's.
#
#     python tools/create_data.py synthetic --out data/nuscenes_tiny_lidar --scenes 3 \
#         --frames 3 --image-size 320x180 --points 16000 --sweeps 2 --val-scenes 1
#     NUSCENES_ROOT=data/nuscenes_tiny_lidar/ python tools/train.py \
#         configs/bevfusion/bevfusion_lidar_tiny_stock.py
# (the data root, GT database included, comes from NUSCENES_ROOT as in the full config)
_base_ = ['./bevfusion_lidar_voxel0075_second_secfpn_8xb4-cyclic-20e_nus-3d_stock.py']

point_cloud_range = [-25.6, -25.6, -5.0, 25.6, 25.6, 3.0]
voxel_size = [0.4, 0.4, 0.2]
grid_size = [128, 128, 41]
max_iters = 12

model = dict(
    data_preprocessor=dict(voxelize_cfg=dict(point_cloud_range=point_cloud_range,
                                             voxel_size=voxel_size,
                                             max_voxels=[20000, 20000])),
    pts_middle_encoder=dict(sparse_shape=grid_size, base_channels=8, output_channels=32,
                            encoder_channels=((8, 8, 16), (16, 16, 32), (32, 32, 32), (32, 32))),
    pts_backbone=dict(in_channels=64, out_channels=[32, 64], layer_nums=[1, 1]),
    pts_neck=dict(in_channels=[32, 64], out_channels=[32, 32]),
    bbox_head=dict(
        num_proposals=50, in_channels=64, hidden_channel=32,
        decoder_layer=dict(
            self_attn_cfg=dict(embed_dims=32, num_heads=4),
            cross_attn_cfg=dict(embed_dims=32, num_heads=4),
            ffn_cfg=dict(embed_dims=32, feedforward_channels=64),
            pos_encoding_cfg=dict(input_channel=2, num_pos_feats=32)),
        train_cfg=dict(point_cloud_range=point_cloud_range, grid_size=grid_size,
                       voxel_size=voxel_size),
        test_cfg=dict(grid_size=grid_size, voxel_size=voxel_size[:2],
                      pc_range=point_cloud_range[:2]),
        bbox_coder=dict(pc_range=point_cloud_range[:2], voxel_size=voxel_size[:2],
                        post_center_range=[-30.0, -30.0, -10.0, 30.0, 30.0, 10.0])))

# The full config's pipelines with this range in the filters (mmengine does not carry a
# changed variable into the base's lists).
class_names = [
    'car', 'truck', 'construction_vehicle', 'bus', 'trailer', 'barrier', 'motorcycle',
    'bicycle', 'pedestrian', 'traffic_cone'
]
data_root = '{{$NUSCENES_ROOT:data/nuscenes/}}'
db_sampler = dict(
    data_root=data_root, info_path=data_root + 'nuscenes_dbinfos_train.pkl', rate=1.0,
    prepare=dict(filter_by_difficulty=[-1],
                 filter_by_min_points={name: 5 for name in class_names}),
    classes=class_names,
    sample_groups=dict(car=2, truck=3, construction_vehicle=7, bus=4, trailer=6, barrier=2,
                       motorcycle=6, bicycle=6, pedestrian=2, traffic_cone=2),
    points_loader=dict(type='LoadPointsFromFile', coord_type='LIDAR', load_dim=5,
                       use_dim=[0, 1, 2, 3, 4]))
points_loaders = [
    dict(type='LoadPointsFromFile', coord_type='LIDAR', load_dim=5, use_dim=5),
    dict(type='LoadPointsFromMultiSweeps', sweeps_num=9, load_dim=5, use_dim=5,
         pad_empty_sweeps=True, remove_close=True),
]
meta_keys = ['box_type_3d', 'sample_idx', 'lidar_path', 'transformation_3d_flow',
             'pcd_rotation', 'pcd_scale_factor', 'pcd_trans', 'lidar_aug_matrix']
train_pipeline = points_loaders + [
    dict(type='LoadAnnotations3D', with_bbox_3d=True, with_label_3d=True,
         with_attr_label=False),
    dict(type='ObjectSample', db_sampler=db_sampler),
    dict(type='GlobalRotScaleTrans', scale_ratio_range=[0.9, 1.1],
         rot_range=[-0.78539816, 0.78539816], translation_std=0.5),
    dict(type='turbox_mm.BEVFusionRandomFlip3D'),
    dict(type='PointsRangeFilter', point_cloud_range=point_cloud_range),
    dict(type='ObjectRangeFilter', point_cloud_range=point_cloud_range),
    dict(type='ObjectNameFilter', classes=class_names),
    dict(type='PointShuffle'),
    dict(type='Pack3DDetInputs', keys=['points', 'gt_bboxes_3d', 'gt_labels_3d'],
         meta_keys=meta_keys),
]
test_pipeline = points_loaders + [
    dict(type='PointsRangeFilter', point_cloud_range=point_cloud_range),
    dict(type='Pack3DDetInputs', keys=['points'], meta_keys=meta_keys + ['num_pts_feats']),
]
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                        dataset=dict(dataset=dict(pipeline=train_pipeline)))
val_dataloader = dict(num_workers=0, persistent_workers=False,
                      dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

optim_wrapper = dict(optimizer=dict(lr=2e-3))
param_scheduler = []
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=max_iters,
                 val_interval=max_iters)
# Seeded, unlike upstream's configs: runs (stock against turbox, or one test against another)
# start from the same weights and data draws.
randomness = dict(seed=0)
default_hooks = dict(logger=dict(interval=1),
                     checkpoint=dict(interval=max_iters, by_epoch=False))
