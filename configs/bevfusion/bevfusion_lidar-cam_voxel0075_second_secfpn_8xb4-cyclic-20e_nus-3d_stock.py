# BEVFusion, camera + lidar: mmdet3d 1.4's projects/BEVFusion config of the same name (its
# name keeps "cyclic-20e"; the schedule is 6 epochs), on turbox_mm's port of the model, the
# lidar-only stock config plus the camera branch (Swin-T, GeneralizedLSSFPN,
# DepthLSSTransform), the ConvFuser and the camera pipeline (no GT-paste). 8 GPUs x 4 samples.
# As upstream, training starts from a lidar-only checkpoint given on the command line, and the
# image backbone from its pretrained weights (upstream's README suggests its nuImages Swin-T):
#
#     python tools/train.py configs/bevfusion/<this file> --cfg-options \
#         load_from=<lidar-only checkpoint> model.img_backbone.init_cfg.checkpoint=<Swin-T>
#
# It reads data/nuscenes/ or $NUSCENES_ROOT. Its turbox twin is the _turbox.py file beside it.
_base_ = ['./bevfusion_lidar_voxel0075_second_secfpn_8xb4-cyclic-20e_nus-3d_stock.py']

point_cloud_range = [-54.0, -54.0, -5.0, 54.0, 54.0, 3.0]
class_names = [
    'car', 'truck', 'construction_vehicle', 'bus', 'trailer', 'barrier', 'motorcycle',
    'bicycle', 'pedestrian', 'traffic_cone'
]
input_modality = dict(use_lidar=True, use_camera=True)
# The camera folders of upstream's data_prefix (the lidar config's img='' stays for any other
# camera key).
data_prefix = dict(CAM_FRONT='samples/CAM_FRONT', CAM_FRONT_LEFT='samples/CAM_FRONT_LEFT',
                   CAM_FRONT_RIGHT='samples/CAM_FRONT_RIGHT', CAM_BACK='samples/CAM_BACK',
                   CAM_BACK_RIGHT='samples/CAM_BACK_RIGHT', CAM_BACK_LEFT='samples/CAM_BACK_LEFT')
backend_args = None

model = dict(
    data_preprocessor=dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
                           bgr_to_rgb=False),
    img_backbone=dict(
        type='mmdet.SwinTransformer', embed_dims=96, depths=[2, 2, 6, 2],
        num_heads=[3, 6, 12, 24], window_size=7, mlp_ratio=4, qkv_bias=True, qk_scale=None,
        drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.2, patch_norm=True,
        out_indices=[1, 2, 3], with_cp=False, convert_weights=True,
        init_cfg=dict(type='Pretrained',
                      checkpoint='https://github.com/SwinTransformer/storage/releases/'
                      'download/v1.0.0/swin_tiny_patch4_window7_224.pth')),
    img_neck=dict(
        type='turbox_mm.GeneralizedLSSFPN', in_channels=[192, 384, 768], out_channels=256,
        start_level=0, num_outs=3, norm_cfg=dict(type='BN2d', requires_grad=True),
        act_cfg=dict(type='ReLU', inplace=True),
        upsample_cfg=dict(mode='bilinear', align_corners=False)),
    view_transform=dict(
        type='turbox_mm.DepthLSSTransform', in_channels=256, out_channels=80,
        image_size=[256, 704], feature_size=[32, 88], xbound=[-54.0, 54.0, 0.3],
        ybound=[-54.0, 54.0, 0.3], zbound=[-10.0, 10.0, 20.0], dbound=[1.0, 60.0, 0.5],
        downsample=2),
    fusion_layer=dict(type='turbox_mm.ConvFuser', in_channels=[80, 256], out_channels=256))

# num_views stays at its default (5) with six cameras, as upstream: it is only recorded.
image_loader = dict(type='turbox_mm.BEVLoadMultiViewImageFromFiles', to_float32=True,
                    color_type='color', backend_args=backend_args)
points_loaders = [
    dict(type='LoadPointsFromFile', coord_type='LIDAR', load_dim=5, use_dim=5,
         backend_args=backend_args),
    dict(type='LoadPointsFromMultiSweeps', sweeps_num=9, load_dim=5, use_dim=5,
         pad_empty_sweeps=True, remove_close=True, backend_args=backend_args),
]
# upstream's lists, 'img_aug_matrix' twice in training included
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
    dict(type='turbox_mm.ImageAug3D', final_dim=[256, 704], resize_lim=[0.38, 0.55],
         bot_pct_lim=[0.0, 0.0], rot_lim=[-5.4, 5.4], rand_flip=True, is_train=True),
    dict(type='turbox_mm.BEVFusionGlobalRotScaleTrans', scale_ratio_range=[0.9, 1.1],
         rot_range=[-0.78539816, 0.78539816], translation_std=0.5),
    dict(type='turbox_mm.BEVFusionRandomFlip3D'),
    dict(type='PointsRangeFilter', point_cloud_range=point_cloud_range),
    dict(type='ObjectRangeFilter', point_cloud_range=point_cloud_range),
    dict(type='ObjectNameFilter', classes=class_names),
    # prob 0: masks nothing, but draws one random number (upstream: "not used here")
    dict(type='turbox_mm.GridMask', use_h=True, use_w=True, max_epoch=6, rotate=1,
         offset=False, ratio=0.5, mode=1, prob=0.0, fixed_prob=True),
    dict(type='PointShuffle'),
    dict(type='Pack3DDetInputs',
         keys=['points', 'img', 'gt_bboxes_3d', 'gt_labels_3d', 'gt_bboxes', 'gt_labels'],
         meta_keys=train_meta_keys),
]
test_pipeline = [image_loader] + points_loaders + [
    dict(type='turbox_mm.ImageAug3D', final_dim=[256, 704], resize_lim=[0.48, 0.48],
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

# The learning rate warms up linearly from 1/3 over 500 iterations while a cosine takes it to
# 1e-4 of itself over 6 epochs; beta1 falls to 0.85 / 0.95 of 0.9 over 2.4 epochs, then rises
# towards 1.
param_scheduler = [
    dict(type='LinearLR', start_factor=0.33333333, by_epoch=False, begin=0, end=500),
    dict(type='CosineAnnealingLR', begin=0, T_max=6, end=6, by_epoch=True, eta_min_ratio=1e-4,
         convert_to_iter_based=True),
    dict(type='CosineAnnealingMomentum', eta_min=0.85 / 0.95, begin=0, end=2.4, by_epoch=True,
         convert_to_iter_based=True),
    dict(type='CosineAnnealingMomentum', eta_min=1, begin=2.4, end=6, by_epoch=True,
         convert_to_iter_based=True),
]
train_cfg = dict(by_epoch=True, max_epochs=6, val_interval=1)
val_cfg = dict()
test_cfg = dict()
optim_wrapper = dict(type='OptimWrapper',
                     optimizer=dict(type='AdamW', lr=0.0002, weight_decay=0.01),
                     clip_grad=dict(max_norm=35, norm_type=2))
auto_scale_lr = dict(enable=False, base_batch_size=32)
default_hooks = dict(logger=dict(type='LoggerHook', interval=50),
                     checkpoint=dict(type='CheckpointHook', interval=1))
# upstream deletes the lidar config's DisableObjectSampleHook (no GT-paste here)
custom_hooks = []
