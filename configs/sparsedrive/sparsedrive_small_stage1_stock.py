# SparseDrive stage 1 (detection, tracking, online map), ResNet-50, 6 cameras at 256x704, 8 GPUs
# x 8 samples, 100 epochs on nuScenes: upstream's training setting (swc-17/SparseDrive,
# projects/configs/sparsedrive_small_stage1.py @ ffebeb4) on mmengine / mmdet3d 1.4, with stock
# components and stock ops. docs/design/sparsedrive.md lists every value and its source.
#
# Data: nuScenes v2 infos with SparseDrive's fields (`tools/create_data.py synthetic` writes
# them) under $NUSCENES_ROOT (default data/nuscenes/), plus the k-means anchors:
#     python tools/sparsedrive_anchors.py det $NUSCENES_ROOT/nuscenes_infos_train.pkl \
#         --out $NUSCENES_ROOT/kmeans/kmeans_det_900.npy
#     python tools/sparsedrive_anchors.py map $NUSCENES_ROOT/nuscenes_infos_train.pkl \
#         --out $NUSCENES_ROOT/kmeans/kmeans_map_100.npy
# The backbone starts from torchvision's ImageNet ResNet-50, as upstream; benchmarks and tests
# switch that off (model.img_backbone.init_cfg=None).
#
# Upstream's flash attention (fp16 inside, no masks) is turbox_mm.MultiheadFlashAttention, the
# same layer on PyTorch's scaled-dot-product attention, here with upstream's half-precision
# arithmetic (fp16_compute=True). Evaluation runs the model in fp16 as upstream's tools/test.py
# does (val_cfg / test_cfg fp16=True).
default_scope = 'mmdet3d'

data_root = '{{$NUSCENES_ROOT:data/nuscenes/}}'
class_names = ['car', 'truck', 'construction_vehicle', 'bus', 'trailer', 'barrier',
               'motorcycle', 'bicycle', 'pedestrian', 'traffic_cone']
map_class_names = ['ped_crossing', 'divider', 'boundary']
num_classes = len(class_names)
num_map_classes = len(map_class_names)
roi_size = (30, 60)
num_sample = 20
num_gpus = 8
batch_size = 8
num_iters_per_epoch = 28130 // (num_gpus * batch_size)
num_epochs = 100
max_iters = num_iters_per_epoch * num_epochs
checkpoint_interval = num_iters_per_epoch * 20
embed_dims = 256
num_groups = 8
num_decoder = 6
num_single_frame_decoder = 1
num_levels = 4
num_cams = 6
drop_out = 0.1
input_shape = (704, 256)  # (W, H)

det_attention = dict(type='turbox_mm.MultiheadFlashAttention', embed_dims=embed_dims * 2,
                     num_heads=num_groups, batch_first=True, dropout=drop_out,
                     fp16_compute=True)
map_attention = dict(det_attention, embed_dims=embed_dims)
norm_layer = dict(type='LN', normalized_shape=embed_dims)
ffn = dict(type='turbox_mm.AsymmetricFFN', in_channels=embed_dims * 2, pre_norm=True,
           embed_dims=embed_dims, feedforward_channels=embed_dims * 4, num_fcs=2,
           ffn_drop=drop_out, act_cfg=dict(type='ReLU', inplace=True))
single_layer = ['gnn', 'norm', 'deformable', 'ffn', 'norm', 'refine']
temporal_layer = ['temp_gnn'] + single_layer

model = dict(
    type='turbox_mm.SparseDrive',
    # Images come normalised from the pipeline (upstream normalises on the CPU).
    data_preprocessor=dict(type='Det3DDataPreprocessor'),
    use_grid_mask=True,
    img_backbone=dict(
        type='mmdet.ResNet', depth=50, num_stages=4, out_indices=(0, 1, 2, 3),
        frozen_stages=-1, norm_cfg=dict(type='BN', requires_grad=True), norm_eval=False,
        style='pytorch', with_cp=True,
        init_cfg=dict(type='Pretrained', checkpoint='torchvision://resnet50')),
    img_neck=dict(
        type='mmdet.FPN', in_channels=[256, 512, 1024, 2048], out_channels=embed_dims,
        num_outs=num_levels, start_level=0, add_extra_convs='on_output',
        relu_before_extra_convs=True),
    depth_branch=dict(type='turbox_mm.DenseDepthNet', embed_dims=embed_dims,
                      num_depth_layers=3, loss_weight=0.2),
    head=dict(
        type='turbox_mm.SparseDriveHead',
        task_config=dict(with_det=True, with_map=True, with_motion_plan=False),
        det_head=dict(
            type='turbox_mm.Sparse4DHead',
            task_prefix='det',
            with_instance_id=True,
            cls_threshold_to_reg=0.05,
            decouple_attn=True,
            num_decoder=num_decoder,
            num_single_frame_decoder=num_single_frame_decoder,
            instance_bank=dict(
                type='turbox_mm.InstanceBank', num_anchor=900, embed_dims=embed_dims,
                anchor=data_root + 'kmeans/kmeans_det_900.npy', num_temp_instances=600,
                confidence_decay=0.6, feat_grad=False, reset_stale_confidence=True),
            anchor_encoder=dict(type='turbox_mm.SparseBox3DEncoder', vel_dims=3,
                                embed_dims=[128, 32, 32, 64], in_loops=1, out_loops=4),
            temp_graph_model=det_attention,
            graph_model=det_attention,
            norm_layer=norm_layer,
            ffn=ffn,
            deformable_model=dict(
                type='turbox_mm.DeformableFeatureAggregation', embed_dims=embed_dims,
                num_groups=num_groups, num_levels=num_levels, num_cams=num_cams,
                attn_drop=0.15, use_camera_embed=True, residual_mode='cat',
                kps_generator=dict(
                    type='turbox_mm.SparseBox3DKeyPointsGenerator', num_learnable_pts=6,
                    fix_scale=[[0, 0, 0], [0.45, 0, 0], [-0.45, 0, 0], [0, 0.45, 0],
                               [0, -0.45, 0], [0, 0, 0.45], [0, 0, -0.45]])),
            refine_layer=dict(type='turbox_mm.SparseBox3DRefinementModule',
                              embed_dims=embed_dims, num_cls=num_classes, refine_yaw=True,
                              with_quality_estimation=True),
            # No denoising in SparseDrive (flash attention takes no mask).
            sampler=dict(
                type='turbox_mm.SparseBox3DTarget', num_dn_groups=0, num_temp_dn_groups=0,
                cls_weight=2.0, box_weight=0.25,
                reg_weights=[2.0] * 3 + [0.5] * 3 + [0.0] * 4,
                cls_wise_reg_weights={
                    class_names.index('traffic_cone'): [2.0, 2.0, 2.0, 1.0, 1.0, 1.0, 0.0,
                                                        0.0, 1.0, 1.0]}),
            loss_cls=dict(type='mmdet.FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25,
                          loss_weight=2.0),
            loss_reg=dict(
                type='turbox_mm.SparseBox3DLoss',
                loss_box=dict(type='mmdet.L1Loss', loss_weight=0.25),
                loss_centerness=dict(type='mmdet.CrossEntropyLoss', use_sigmoid=True),
                loss_yawness=dict(type='mmdet.GaussianFocalLoss'),
                cls_allow_reverse=[class_names.index('barrier')]),
            decoder=dict(type='turbox_mm.SparseBox3DDecoder'),
            reg_weights=[2.0] * 3 + [1.0] * 7),
        map_head=dict(
            type='turbox_mm.Sparse4DHead',
            task_prefix='map',
            with_instance_id=False,
            gt_cls_key='gt_map_labels',
            gt_reg_key='gt_map_pts',
            gt_id_key='map_instance_id',
            cls_threshold_to_reg=0.05,
            decouple_attn=False,
            num_decoder=num_decoder,
            num_single_frame_decoder=num_single_frame_decoder,
            # Unlike the det head, the first layer keeps its self-attention.
            operation_order=(single_layer * num_single_frame_decoder +
                             temporal_layer * (num_decoder - num_single_frame_decoder)),
            instance_bank=dict(
                type='turbox_mm.InstanceBank', num_anchor=100, embed_dims=embed_dims,
                anchor=data_root + 'kmeans/kmeans_map_100.npy',
                anchor_handler=dict(type='turbox_mm.SparsePoint3DKeyPointsGenerator'),
                num_temp_instances=0, confidence_decay=0.6, feat_grad=True,
                reset_stale_confidence=True),
            anchor_encoder=dict(type='turbox_mm.SparsePoint3DEncoder', embed_dims=embed_dims,
                                num_sample=num_sample),
            temp_graph_model=map_attention,
            graph_model=map_attention,
            norm_layer=norm_layer,
            ffn=ffn,
            deformable_model=dict(
                type='turbox_mm.DeformableFeatureAggregation', embed_dims=embed_dims,
                num_groups=num_groups, num_levels=num_levels, num_cams=num_cams,
                attn_drop=0.15, use_camera_embed=True, residual_mode='cat',
                kps_generator=dict(
                    type='turbox_mm.SparsePoint3DKeyPointsGenerator', embed_dims=embed_dims,
                    num_sample=num_sample, num_learnable_pts=3,
                    fix_height=(0, 0.5, -0.5, 1, -1),
                    ground_height=-1.84023)),  # the ground in the lidar frame
            refine_layer=dict(type='turbox_mm.SparsePoint3DRefinementModule',
                              embed_dims=embed_dims, num_sample=num_sample,
                              num_cls=num_map_classes),
            # The assigner is SparsePoint3DTarget's default, upstream's: HungarianLinesAssigner(
            # MapQueriesCost(FocalLossCost(weight 1.0), LinesL1Cost(weight 10.0, beta 0.01,
            # permute))); those three names are read by the target, not built by a registry.
            sampler=dict(
                type='turbox_mm.SparsePoint3DTarget',
                num_cls=num_map_classes, num_sample=num_sample, roi_size=roi_size),
            loss_cls=dict(type='mmdet.FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25,
                          loss_weight=1.0),
            loss_reg=dict(type='turbox_mm.SparseLineLoss',
                          loss_line=dict(type='turbox_mm.LinesL1Loss', loss_weight=10.0,
                                         beta=0.01),
                          num_sample=num_sample, roi_size=roi_size),
            decoder=dict(type='turbox_mm.SparsePoint3DDecoder'),
            reg_weights=[1.0] * num_sample * 2)))

# -- data -------------------------------------------------------------------------------------
cameras = ['CAM_FRONT', 'CAM_FRONT_RIGHT', 'CAM_FRONT_LEFT', 'CAM_BACK', 'CAM_BACK_LEFT',
           'CAM_BACK_RIGHT']
data_prefix = dict(pts='samples/LIDAR_TOP', sweeps='sweeps/LIDAR_TOP',
                   **{cam: f'samples/{cam}' for cam in cameras})
img_norm_cfg = dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)
# No BEV rotation (rot3d_range [0, 0]): the map and trajectory targets are not rotated.
data_aug_conf = dict(resize_lim=(0.40, 0.47), final_dim=input_shape[::-1],
                     bot_pct_lim=(0.0, 0.0), rot_lim=(-5.4, 5.4), H=900, W=1600,
                     rand_flip=True, rot3d_range=[0, 0])
# Sparse4D's meta keys plus SparseDrive's (turbox_mm.datasets.transforms.SPARSEDRIVE_META_KEYS).
meta_keys = ('projection_mat', 'image_wh', 'T_global', 'T_global_inv', 'timestamp', 'focal',
             'gt_depth', 'instance_id', 'sample_idx', 'token', 'box_type_3d', 'img_shape',
             'lidar2img', 'scene_token', 'frame_idx', 'gt_map_labels', 'gt_map_pts',
             'gt_agent_fut_trajs', 'gt_agent_fut_masks', 'gt_ego_fut_trajs', 'gt_ego_fut_masks',
             'gt_ego_fut_cmd', 'ego_status', 'lidar2ego')
train_pipeline = [
    dict(type='LoadMultiViewImageFromFiles', to_float32=True, num_views=num_cams),
    dict(type='LoadPointsFromFile', coord_type='LIDAR', load_dim=5, use_dim=5),
    dict(type='LoadAnnotations3D', with_bbox_3d=True, with_label_3d=True),
    dict(type='turbox_mm.ResizeCropFlipImage'),
    dict(type='turbox_mm.MultiScaleDepthMapGenerator', downsample=[4, 8, 16]),
    dict(type='turbox_mm.BBoxRotation'),
    dict(type='turbox_mm.PhotoMetricDistortionMultiViewImage'),
    dict(type='turbox_mm.NormalizeMultiviewImage', **img_norm_cfg),
    dict(type='turbox_mm.CircleObjectRangeFilter', class_dist_thred=[55] * num_classes),
    dict(type='turbox_mm.InstanceNameFilter', classes=class_names),
    dict(type='turbox_mm.VectorizeMap', map_classes=map_class_names, roi_size=roi_size,
         simplify=False, normalize=False, sample_num=num_sample, permute=True),
    dict(type='turbox_mm.NuScenesSparseDriveAdaptor'),
    dict(type='Pack3DDetInputs', keys=['img', 'gt_bboxes_3d', 'gt_labels_3d'],
         meta_keys=meta_keys),
]
test_pipeline = [
    dict(type='LoadMultiViewImageFromFiles', to_float32=True, num_views=num_cams),
    dict(type='turbox_mm.ResizeCropFlipImage'),
    dict(type='turbox_mm.NormalizeMultiviewImage', **img_norm_cfg),
    dict(type='turbox_mm.NuScenesSparseDriveAdaptor'),
    dict(type='Pack3DDetInputs', keys=['img'], meta_keys=meta_keys),
]
dataset_common = dict(
    type='turbox_mm.SparseDriveNuScenesDataset', data_root=data_root,
    data_prefix=data_prefix, metainfo=dict(classes=class_names),
    map_classes=map_class_names, modality=dict(use_lidar=True, use_camera=True),
    data_aug_conf=data_aug_conf, box_type_3d='LiDAR', backend_args=None)
train_dataloader = dict(
    batch_size=batch_size,
    num_workers=batch_size,
    sampler=dict(type='DefaultSampler', shuffle=False),
    # Each of the batch's slots walks one half-scene in temporal order, upstream's sampler
    # (SparseDrive: no skipped or reversed sequences).
    batch_sampler=dict(type='turbox_mm.GroupInBatchSampler', sequences_split_num=2,
                       skip_prob=0.0, sequence_flip_prob=0.0, keep_consistent_seq_aug=True),
    collate_fn=dict(type='pseudo_collate'),
    dataset=dict(dataset_common, ann_file='nuscenes_infos_train.pkl',
                 pipeline=train_pipeline, test_mode=False, filter_empty_gt=False))
# Whole scenes in order on every rank (see configs/sparse4d for why).
val_dataloader = dict(
    batch_size=1,
    num_workers=4,
    sampler=dict(type='turbox_mm.SequenceSampler'),
    collate_fn=dict(type='pseudo_collate'),
    dataset=dict(dataset_common, ann_file='nuscenes_infos_val.pkl', pipeline=test_pipeline,
                 test_mode=True))
test_dataloader = val_dataloader
# Upstream's eval modes of stage 1: detection (NDS, mAP), tracking (AMOTA; boxes with a class
# score >= 0.2) and the map's Chamfer AP (StreamMapNet's procedure). Tracking needs
# `pip install 'turbox_mm[tracking]'`.
val_evaluator = dict(
    type='turbox_mm.OrderedEvaluator',
    metrics=[
        dict(type='turbox_mm.NuScenesTrackingMetric', data_root=data_root,
             ann_file=data_root + 'nuscenes_infos_val.pkl', metric=['bbox', 'tracking'],
             tracking_threshold=0.2, modality=dict(use_camera=True, use_lidar=False),
             backend_args=None),
        dict(type='turbox_mm.SparseDriveMapMetric', classes=map_class_names),
    ])
test_evaluator = val_evaluator

# -- schedule ---------------------------------------------------------------------------------
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters,
                 val_interval=checkpoint_interval)
val_cfg = dict(type='ValLoop', fp16=True)
test_cfg = dict(type='TestLoop', fp16=True)
# Upstream: mmcv's Fp16OptimizerHook with a static loss scale of 32.
optim_wrapper = dict(
    type='AmpOptimWrapper',
    loss_scale=32.0,
    optimizer=dict(type='AdamW', lr=4e-4, weight_decay=1e-3),
    paramwise_cfg=dict(custom_keys={'img_backbone': dict(lr_mult=0.5)}),
    clip_grad=dict(max_norm=25, norm_type=2))
param_scheduler = [
    dict(type='LinearLR', start_factor=1.0 / 3, by_epoch=False, begin=0, end=500),
    dict(type='CosineAnnealingLR', T_max=max_iters, eta_min_ratio=1e-3, by_epoch=False,
         begin=0, end=max_iters),
]

default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=51),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', interval=checkpoint_interval, by_epoch=False,
                    max_keep_ckpts=3),
    sampler_seed=dict(type='DistSamplerSeedHook'))
env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'))
log_processor = dict(type='LogProcessor', window_size=50, by_epoch=False)
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=0)
