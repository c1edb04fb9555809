# A tiny camera + lidar BEVFusion for CPU tests and the no-GPU demo: the tiny lidar-only
# config (0.4 m voxels over +-25.6 m, a 16 x 16 BEV, narrow layers, a constant learning rate;
# 6 iterations here) plus a narrow camera branch: a one-block-a-stage Swin (16 wide, no
# pretrained weights), 64 x 192 images (8 x 24 features), a 1.6 m camera grid downsampled to
# the lidar's 16 x 16. The camera pipeline is the full lidar-camera config's (no GT-paste,
# BEVFusion's rotation / scale / translation and flips, GridMask at probability 0) with
# ImageAug3D's resize range scaled for 320 x 180 images (final width / image width 0.6
# against upstream's 704 / 1600: resize x 1.36).
#
#     python tools/create_data.py synthetic --out data/nuscenes_tiny --scenes 3 --frames 3 \
#         --image-size 320x180 --points 1500 --sweeps 2 --val-scenes 1
# (no GT-paste, so far fewer points than the lidar-only tiny config needs: the CPU sparse
# convolutions are most of a step's time)
#     NUSCENES_ROOT=data/nuscenes_tiny/ python tools/train.py \
#         configs/bevfusion/bevfusion_lidar-cam_tiny_stock.py
_base_ = ['./bevfusion_lidar_tiny_stock.py']

point_cloud_range = [-25.6, -25.6, -5.0, 25.6, 25.6, 3.0]
class_names = [
    'car', 'truck', 'construction_vehicle', 'bus', 'trailer', 'barrier', 'motorcycle',
    'bicycle', 'pedestrian', 'traffic_cone'
]
input_modality = dict(use_lidar=True, use_camera=True)
data_prefix = dict(CAM_FRONT='samples/CAM_FRONT', CAM_FRONT_LEFT='samples/CAM_FRONT_LEFT',
                   CAM_FRONT_RIGHT='samples/CAM_FRONT_RIGHT', CAM_BACK='samples/CAM_BACK',
                   CAM_BACK_RIGHT='samples/CAM_BACK_RIGHT', CAM_BACK_LEFT='samples/CAM_BACK_LEFT')
image_size = [64, 192]  # a multiple of the preprocessor's pad_size_divisor (32)
max_iters = 6

model = dict(
    data_preprocessor=dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
                           bgr_to_rgb=False),
    img_backbone=dict(
        type='mmdet.SwinTransformer', embed_dims=16, depths=[1, 1, 1, 1],
        num_heads=[1, 2, 4, 8], window_size=7, mlp_ratio=4, qkv_bias=True, qk_scale=None,
        drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.2, patch_norm=True,
        out_indices=[1, 2, 3], with_cp=False, init_cfg=None),
    img_neck=dict(
        type='turbox_mm.GeneralizedLSSFPN', in_channels=[32, 64, 128], out_channels=32,
        start_level=0, num_outs=3, norm_cfg=dict(type='BN2d', requires_grad=True),
        act_cfg=dict(type='ReLU', inplace=True),
        upsample_cfg=dict(mode='bilinear', align_corners=False)),
    view_transform=dict(
        type='turbox_mm.DepthLSSTransform', in_channels=32, out_channels=16,
        image_size=image_size, feature_size=[image_size[0] // 8, image_size[1] // 8],
        xbound=[-25.6, 25.6, 1.6], ybound=[-25.6, 25.6, 1.6], zbound=[-10.0, 10.0, 20.0],
        dbound=[1.0, 60.0, 0.5], downsample=2),
    fusion_layer=dict(type='turbox_mm.ConvFuser', in_channels=[16, 64], out_channels=64))

image_loader = dict(type='turbox_mm.BEVLoadMultiViewImageFromFiles', to_float32=True,
                    color_type='color')
points_loaders = [
    dict(type='LoadPointsFromFile', coord_type='LIDAR', load_dim=5, use_dim=5),
    dict(type='LoadPointsFromMultiSweeps', sweeps_num=9, load_dim=5, use_dim=5,
         pad_empty_sweeps=True, remove_close=True),
]
train_meta_keys = ['cam2img', 'ori_cam2img', 'lidar2cam', 'lidar2img', 'cam2lidar',
                   'ori_lidar2img', 'img_aug_matrix', 'box_type_3d', 'sample_idx', 'lidar_path',
                   'img_path', 'transformation_3d_flow', 'pcd_rotation', 'pcd_scale_factor',
                   'pcd_trans', 'img_aug_matrix', 'lidar_aug_matrix', 'num_pts_feats']
test_meta_keys = ['cam2img', 'ori_cam2img', 'lidar2cam', 'lidar2img', 'cam2lidar',
                  'ori_lidar2img', 'img_aug_matrix', 'box_type_3d', 'sample_idx', 'lidar_path',
                  'img_path', 'num_pts_feats']
train_pipeline = [image_loader] + points_loaders + [
    dict(type='LoadAnnotations3D', with_bbox_3d=True, with_label_3d=True,
         with_attr_label=False),
    dict(type='turbox_mm.ImageAug3D', final_dim=image_size, resize_lim=[0.52, 0.75],
         bot_pct_lim=[0.0, 0.0], rot_lim=[-5.4, 5.4], rand_flip=True, is_train=True),
    dict(type='turbox_mm.BEVFusionGlobalRotScaleTrans', scale_ratio_range=[0.9, 1.1],
         rot_range=[-0.78539816, 0.78539816], translation_std=0.5),
    dict(type='turbox_mm.BEVFusionRandomFlip3D'),
    dict(type='PointsRangeFilter', point_cloud_range=point_cloud_range),
    dict(type='ObjectRangeFilter', point_cloud_range=point_cloud_range),
    dict(type='ObjectNameFilter', classes=class_names),
    dict(type='turbox_mm.GridMask', use_h=True, use_w=True, max_epoch=6, rotate=1,
         offset=False, ratio=0.5, mode=1, prob=0.0, fixed_prob=True),
    dict(type='PointShuffle'),
    dict(type='Pack3DDetInputs',
         keys=['points', 'img', 'gt_bboxes_3d', 'gt_labels_3d', 'gt_bboxes', 'gt_labels'],
         meta_keys=train_meta_keys),
]
test_pipeline = [image_loader] + points_loaders + [
    dict(type='turbox_mm.ImageAug3D', final_dim=image_size, resize_lim=[0.65, 0.65],
         bot_pct_lim=[0.0, 0.0], rot_lim=[0.0, 0.0], rand_flip=False, is_train=False),
    dict(type='PointsRangeFilter', point_cloud_range=point_cloud_range),
    dict(type='Pack3DDetInputs', keys=['img', 'points', 'gt_bboxes_3d', 'gt_labels_3d'],
         meta_keys=test_meta_keys),
]
train_dataloader = dict(dataset=dict(dataset=dict(
    pipeline=train_pipeline, modality=input_modality, data_prefix=data_prefix)))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline, modality=input_modality,
                                   data_prefix=data_prefix))
test_dataloader = val_dataloader
custom_hooks = []

train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
default_hooks = dict(checkpoint=dict(interval=max_iters))
